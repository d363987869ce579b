"""Checks that refuse a sweep that cannot work before it costs anything, and watches for one that waits forever.

Before Ray starts (`sweep/run.py` ``validate``), each a `PreflightError` (exit 2) naming what is wrong and the fix:

- `check_local_resources`: a local Ray with fewer CPUs or GPUs than one trial (and the base model's build task)
  asks for would leave the request pending forever;
- `lock_sweep`: two sweeps with the same ``--name`` in one storage would interleave in one Optuna study and one
  MLflow parent run; the second is refused while the first runs (`SweepLock`);
- `check_weights`: ``--weights`` names a file that is missing, or a torchvision file whose sha256 does not match
  the prefix in its name;
- `check_gpus_for_preset`: a real-data (``poster-*``) sweep on a cluster with ``--gpus-per-trial 0`` would run
  every trial on the GPU workers' CPUs (refused unless ``--cpu-only``);
- `check_base_inputs`: PCA whitening with more dimensions than the training split allows, and images that cannot
  be decoded (every image of every split, checked in parallel once and remembered by path, size and mtime).

After Ray starts: `check_cluster_resources` refuses a request no node (and no autoscaler node type) can ever hold.
While the sweep runs, ``--pending-timeout`` stops a sweep whose base build task (`reserve`) or trials
(`PendingTrialsCallback` with `watch_trials`) wait for resources longer than that: `PendingTimeout`, results so far
kept. The refusals and their fixes are listed in docs/troubleshooting.md.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray

from sweep import storage as sweep_storage
from trainables.base import META_FILE, BaseConfig
from trainables.data.images import is_readable
from trainables.data.oxford import RetrievalDataset, _how_to_get
from trainables.data.registry import load_dataset
from trainables.devices import loader_workers
from trainables.fileio import atomic_write, user_cache_dir
from trainables.netvlad.backbones import (
    WeightsError,
    WeightsNotFoundError,
    _check_hash_prefix,
    imagenet_weights_path,
    imagenet_weights_url,
)
from trainables.progress import progress

log = logging.getLogger("vladsweep.preflight")

#: ``--pending-timeout`` when none is given: long enough for an autoscaler to boot a GPU node (minutes).
DEFAULT_PENDING_TIMEOUT_S = 900.0

#: The sweep's lock in its experiment folder (`SweepLock`): owner host, pid and start time, as JSON.
LOCK_FILE = ".vladsweep-lock.json"

#: At most this many bad files are named in an error; the rest are counted.
_SHOW_FILES = 5


class PreflightError(RuntimeError):
    """A sweep that cannot work as asked, found before anything ran; the message says what would."""


class PendingTimeout(RuntimeError):
    """The base build task or the trials waited for resources longer than ``--pending-timeout``; the message
    says for what, what the cluster has, and what to do."""


# ------------------------------------------------------------------------------------------- resources


def base_task_cpus(cpus_per_trial: float) -> float:
    """CPUs of the base model's build task: a trial's, but at least one (the build is single-task torch work)."""
    return max(float(cpus_per_trial), 1.0)


def resource_request(cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """The largest request a sweep makes of one node: the base build task's (a trial asks the same or less)."""
    return {"CPU": base_task_cpus(cpus_per_trial), "GPU": float(gpus_per_trial)}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {resources.get(key, 0):g}" for key in ("CPU", "GPU"))


def _fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(key, 0) >= amount for key, amount in request.items() if amount > 0)


def local_resources() -> dict[str, float]:
    """CPUs and GPUs a local Ray started here would have: Ray's own detection (cgroup CPU limits, the GPUs
    CUDA_VISIBLE_DEVICES leaves), without starting Ray; torch and the CPU affinity when that fails."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus(override_docker_cpu_warning=True))
        manager = get_accelerator_manager_for_resource("GPU")
        gpus = manager.get_current_node_num_accelerators() if manager is not None else 0
        visible = manager.get_current_process_visible_accelerator_ids() if manager is not None else None
        if visible is not None:
            gpus = min(gpus, len(visible))
        return {"CPU": cpus, "GPU": float(gpus)}
    except Exception:
        import torch

        return {"CPU": float(len(os.sched_getaffinity(0))), "GPU": float(torch.cuda.device_count())}


def check_local_resources(cpus_per_trial: float, gpus_per_trial: float, on_cluster: bool) -> None:
    """Refuse a local Ray that could never run one trial or the base build task (Ray would keep the request
    pending and its autoscaler print "No available node types can fulfill resource request" forever). A sweep
    that joins a cluster (``on_cluster``: sweep/run.py ``joins_cluster``) is judged after Ray starts
    (`check_cluster_resources`)."""
    if on_cluster or ray.is_initialized():
        return
    have = local_resources()
    need = resource_request(cpus_per_trial, gpus_per_trial)
    if need["GPU"] > have["GPU"]:
        instead = f"{have['GPU']:g} or less (0 runs on CPUs)" if have["GPU"] else "0 to run on CPUs"
        raise PreflightError(
            f"--gpus-per-trial {gpus_per_trial:g}: this machine has {have['GPU']:g} GPU(s) for Ray "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}), so a local Ray would "
            f"wait for them forever. Pass --gpus-per-trial {instead}, or run on a cluster with GPUs: "
            "--ray-address HOST:PORT, or ray submit cluster/gpu.yaml sweep/run.py -- …"
        )
    if need["CPU"] > have["CPU"]:
        raise PreflightError(
            f"--cpus-per-trial {cpus_per_trial:g}: this machine has {have['CPU']:g} CPU(s) for Ray and a trial "
            f"(and the base model's build task, which asks max(--cpus-per-trial, 1)) needs {need['CPU']:g} on one "
            f"machine, so a local Ray would wait forever. Pass --cpus-per-trial {have['CPU']:g} or less, or "
            "--ray-address HOST:PORT of a cluster with bigger nodes"
        )


def check_loader_workers() -> None:
    """Refuse a malformed ``$VLADSWEEP_LOADER_WORKERS`` here, before Ray starts, rather than in every trial
    (`trainables.devices.loader_workers` reads it in each trial process)."""
    try:
        loader_workers(1)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_gpus_for_preset(preset: str, gpus_per_trial: float, cpu_only: bool, on_cluster: bool) -> None:
    """A real-data (``poster-*``) sweep that joins a cluster (``on_cluster``: sweep/run.py ``joins_cluster``)
    asks for GPUs, or says ``--cpu-only``: with the default ``--gpus-per-trial 0`` Ray would schedule every trial
    on the GPU workers' few CPUs and leave their GPUs idle, for days of a VGG16 sweep."""
    if cpu_only and gpus_per_trial > 0:
        raise PreflightError(
            f"--cpu-only with --gpus-per-trial {gpus_per_trial:g}: pick one (drop --cpu-only to use GPUs)"
        )
    if on_cluster and preset.startswith("poster-") and gpus_per_trial == 0 and not cpu_only:
        raise PreflightError(
            f"base preset {preset} on a Ray cluster with --gpus-per-trial 0 would run every trial on CPUs. "
            "Pass --gpus-per-trial 1 (or 0.5 to put two trials on a GPU), or --cpu-only to run on CPUs on purpose"
        )


def _bootstrap_node_types() -> list[dict[str, float]] | None:
    """Node types of the cluster launcher's config on the head (`ray up` writes ``~/ray_bootstrap_config.yaml``
    there and `ray submit` runs the driver there); None when absent or when a type's resources are left to
    detection (then only the nodes up now say what a node has)."""
    path = Path("~/ray_bootstrap_config.yaml").expanduser()
    if not path.is_file():
        return None
    try:
        import yaml

        config = yaml.safe_load(path.read_text()) or {}
    except Exception:
        return None
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    shapes = []
    for name, spec in types.items():
        spec = spec or {}
        if name != head and spec.get("max_workers", 1) == 0:
            continue
        resources = spec.get("resources")
        if not resources:
            return None
        shapes.append({k: float(v) for k, v in resources.items()})
    return shapes or None


def autoscaler_node_types() -> tuple[list[dict[str, float]] | None, str]:
    """``(resources of each node type the autoscaler may start, where that was read)``, or ``(None, "")`` when
    no autoscaler config is readable here (a cluster of `ray start` nodes, or a driver away from the head)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # not connected, or Ray's internals moved
        config = None
    if config is not None and config.node_group_configs:
        shapes = [
            {k: float(v) for k, v in group.resources.items()}
            for group in config.node_group_configs
            if group.max_count != 0
        ]
        if shapes:
            return shapes, "the autoscaler's node types (GCS)"
    shapes = _bootstrap_node_types()
    if shapes:
        return shapes, "the node types of ~/ray_bootstrap_config.yaml"
    return None, ""


def check_cluster_resources(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """After Ray started or was joined: refuse a request that no node up now, and no node type the autoscaler
    may start, can ever hold (it would stay pending forever)."""
    need = resource_request(cpus_per_trial, gpus_per_trial)
    nodes = [
        {k: float(v) for k, v in node.get("Resources", {}).items()}
        for node in ray.nodes()
        if node.get("Alive")
    ]
    types, source = autoscaler_node_types()
    if any(_fits(need, node) for node in nodes) or any(_fits(need, t) for t in types or []):
        return
    shapes = sorted({_fmt(n) for n in nodes})
    judged = (
        f"{source}: " + "; ".join(sorted({_fmt(t) for t in types}))
        if types
        else "no autoscaler node types are readable here, so this is judged from the nodes up now"
    )
    most_cpu = max(
        [n.get("CPU", 0) for n in [*nodes, *(types or [])] if n.get("GPU", 0) >= need["GPU"]] or [0]
    )
    most_gpu = max([n.get("GPU", 0) for n in [*nodes, *(types or [])]] or [0])
    raise PreflightError(
        f"--cpus-per-trial {cpus_per_trial:g} --gpus-per-trial {gpus_per_trial:g}: no node of the Ray cluster "
        f"can ever hold one trial's request ({_fmt(need)} on one node; the base model's build task asks "
        f"max(--cpus-per-trial, 1) CPUs). Its {len(nodes)} node(s) have {' / '.join(shapes) or 'nothing'} each "
        f"({judged}). Pass --cpus-per-trial {most_cpu:g} or less and --gpus-per-trial {most_gpu:g} or less, or "
        "add a node type that big to the cluster config"
    )


def _cluster_now() -> str:
    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    free = {k: float(v) for k, v in ray.available_resources().items()}
    return f"the cluster has {_fmt(total)} in all and {_fmt(free)} free now"


def _pending_fix(timeout_s: float) -> str:
    return (
        f"Free them (another job holds them) or add nodes, lower --cpus-per-trial / --gpus-per-trial, or pass "
        f"--pending-timeout 0 to wait for them however long it takes (it was {timeout_s:g} s)"
    )


@contextmanager
def reserve(
    cpus: float, gpus: float, timeout_s: float, what: str = "the base model's build task"
) -> Iterator[Any]:
    """Reserve ``cpus``/``gpus`` on one node for ``what`` (a Ray task), waiting at most ``timeout_s``: yields the
    scheduling strategy that runs the task in the reservation (None, Ray's default, when ``timeout_s`` is 0 =
    wait forever). A placement group is the reservation: the driver sees when it is ready, which a plain task's
    ObjectRef never tells (pending and running look the same). Raises `PendingTimeout`; Ctrl-C lands within
    half a second; the reservation goes on exit."""
    if timeout_s <= 0:
        yield None
        return
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    request = {"CPU": float(cpus), "GPU": float(gpus)}
    group = placement_group([{k: v for k, v in request.items() if v > 0}])
    try:
        deadline = time.monotonic() + timeout_s
        ready = group.ready()
        while not ray.wait([ready], timeout=0.5)[0]:
            if time.monotonic() > deadline:
                raise PendingTimeout(
                    f"{what} waited {timeout_s:g} s (--pending-timeout) for {_fmt(request)} on one node and never "
                    f"started: {_cluster_now()}. {_pending_fix(timeout_s)}"
                )
        yield PlacementGroupSchedulingStrategy(group)
    finally:
        with suppress(Exception):
            remove_placement_group(group)


# ------------------------------------------------------------------------------------------- pending trials


class _TrialWatch:
    """The clock of ``--pending-timeout`` for the trials: it runs while some trial is PENDING and none RUNNING
    (a trial waiting for a slot another trial of the sweep holds is progress, not a stall) and stops Ray Tune
    once it passes ``timeout_s``."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.stalled_since: float | None = None
        self.reason: str | None = None

    def observe(self, trials: Sequence[Any]) -> None:
        if self.reason is not None:
            return
        pending = [t for t in trials if t.status == "PENDING"]
        if not pending or any(t.status == "RUNNING" for t in trials):
            self.stalled_since = None
            return
        now = time.monotonic()
        if self.stalled_since is None:
            self.stalled_since = now
            return
        if now - self.stalled_since < self.timeout_s:
            return
        asks = sorted({_fmt(dict(t.placement_group_factory.required_resources)) for t in pending})
        self.reason = (
            f"no trial could start for {self.timeout_s:g} s (--pending-timeout): {len(pending)} trial(s) wait in "
            f"PENDING for {' / '.join(asks)} each and none runs; {_cluster_now()}. {_pending_fix(self.timeout_s)}"
        )
        log.error("%s", self.reason)
        _stop_tune(self.reason)


def _stop_tune(reason: str) -> None:
    """Stop Ray Tune as a Ctrl-C does (trials saved as they are, the experiment state written for --resume):
    Tune's handler of SIGUSR1 is its SIGINT handler's twin (ray/tune/tune.py ``_setup_signal_catching``). Without
    that handler SIGUSR1 would kill the process, so then the run ends with the error instead."""
    if callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)
    else:
        raise PendingTimeout(reason)


#: The watch of the sweep running in this process (`watch_trials`); the callback Tune pickled with the run
#: config (and brings back on --resume) holds nothing itself and reports here.
_TRIAL_WATCH: _TrialWatch | None = None


@contextmanager
def watch_trials(timeout_s: float) -> Iterator[None]:
    """Around ``tuner.fit()``: the trials' ``--pending-timeout`` (0 = none). Raises `PendingTimeout` after ``fit``
    returns when the watch stopped it."""
    global _TRIAL_WATCH
    watch = _TrialWatch(timeout_s) if timeout_s > 0 else None
    _TRIAL_WATCH = watch
    try:
        yield
    except Exception as exc:
        if watch is not None and watch.reason is not None:
            raise PendingTimeout(watch.reason) from exc
        raise
    finally:
        _TRIAL_WATCH = None
    if watch is not None and watch.reason is not None:
        raise PendingTimeout(watch.reason)


def _make_pending_trials_callback() -> type:
    from ray.tune import Callback

    class PendingTrialsCallback(Callback):
        """The Ray Tune callback that shows each step's trials to the running `watch_trials`."""

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if _TRIAL_WATCH is not None:
                _TRIAL_WATCH.observe(trials)

    # Under its module-level name, so Tune's (cloud)pickle of the run config refers to it and --resume finds it.
    PendingTrialsCallback.__qualname__ = "PendingTrialsCallback"
    PendingTrialsCallback.__module__ = __name__
    return PendingTrialsCallback


def __getattr__(name: str) -> Any:
    # `PendingTrialsCallback` is made on first use: Tune's Callback base costs a second of import that a refused
    # start (exit 2) never needs.
    if name == "PendingTrialsCallback":
        cls = _make_pending_trials_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- the sweep's lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _owner_text(owner: dict[str, Any]) -> str:
    return (
        f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"
    )


class SweepLock:
    """One sweep of a name at a time in a storage: ``<experiment dir>/.vladsweep-lock.json`` names its owner.

    Local and NFS paths: an ``flock`` on that file, which the kernel drops when the owner exits however it
    exits, so a lock is never stale; the JSON inside only names the owner for the error (and a leftover one, of
    an owner gone without releasing, is taken over with a log line). Where the filesystem has no ``flock``, and
    for URI storage (``s3://``: no atomic create-if-absent), a marker instead: written if absent, read back to
    see that no other start overwrote it. Its limits: two starts within the same moment can both pass; an owner
    on this host is known to be gone when its pid is, but one on another host cannot be checked from here, so
    its marker has to be deleted by hand (the error names it) once that sweep is known to be over."""

    def __init__(self, sweep: sweep_storage.SweepStorage, use_flock: bool | None = None):
        self.sweep = sweep
        self.location = f"{sweep.experiment_dir}/{LOCK_FILE}"
        self.use_flock = sweep.is_local if use_flock is None else use_flock
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._marker = False

    def _owner(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": self.token,
        }

    def _refuse(self, owner: dict[str, Any], extra: str = "") -> PreflightError:
        return PreflightError(
            f"sweep {self.sweep.name!r} in {self.sweep.root} is already running: {_owner_text(owner)} (lock "
            f"{self.location}). Two sweeps of one name would interleave in one Optuna study and one MLflow parent "
            f"run: wait for it to end, or pass another --name{extra}"
        )

    def acquire(self) -> None:
        """Take the lock, or raise `PreflightError` naming the live owner."""
        if self.use_flock:
            fd = os.open(self.location, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read_fd(fd, retry=True)
                os.close(fd)
                raise self._refuse(owner) from None
            except OSError:  # no flock on this filesystem (some NFS mounts): the marker's rules
                os.close(fd)
                self.use_flock = False
            else:
                previous = self._read_fd(fd)
                if previous:
                    log.info(
                        "taking over the lock of sweep %r left by %s, which is no longer running",
                        self.sweep.name,
                        _owner_text(previous),
                    )
                self._write_fd(fd, self._owner())
                self._fd = fd
                return
        self._acquire_marker()

    @staticmethod
    def _read_fd(fd: int, retry: bool = False) -> dict[str, Any]:
        # The owner writes its JSON right after taking the flock: a reader racing it may see an empty file.
        for _ in range(10 if retry else 1):
            with suppress(ValueError):
                data = os.pread(fd, 1 << 16, 0)
                if data.strip():
                    return json.loads(data)
            if retry:
                time.sleep(0.05)
        return {}

    @staticmethod
    def _write_fd(fd: int, owner: dict[str, Any]) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)

    def _read_marker(self) -> dict[str, Any]:
        fs, path = sweep_storage.filesystem_for(self.location)
        try:
            with fs.open_input_stream(path) as stream:
                data = stream.readall()
        except (FileNotFoundError, OSError):
            return {}
        with suppress(ValueError):
            return json.loads(data) if data.strip() else {}
        return {}

    def _acquire_marker(self) -> None:
        owner = self._read_marker()
        if owner:
            if owner.get("host") != socket.gethostname():
                raise self._refuse(
                    owner,
                    f". A lock held from another host cannot be checked from here: if that sweep is over, delete "
                    f"{self.location}",
                )
            if _pid_alive(int(owner.get("pid", -1))):
                raise self._refuse(owner)
            log.info(
                "taking over the lock of sweep %r left by %s, which is no longer running",
                self.sweep.name,
                _owner_text(owner),
            )
        fs, path = sweep_storage.filesystem_for(self.location)
        with fs.open_output_stream(path) as stream:
            stream.write((json.dumps(self._owner()) + "\n").encode())
        now = self._read_marker()
        if now.get("token") != self.token:
            raise self._refuse(now)
        self._marker = True

    def release(self) -> None:
        """Give the lock back (idempotent). The file stays: deleting a file others may hold open would let two
        owners lock two different files of one name."""
        if self._fd is not None:
            with suppress(OSError):
                os.ftruncate(self._fd, 0)
            with suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._marker:
            self._marker = False
            if self._read_marker().get("token") == self.token:
                fs, path = sweep_storage.filesystem_for(self.location)
                with suppress(Exception):
                    fs.delete_file(path)


_HELD: list[SweepLock] = []


def lock_sweep(sweep: sweep_storage.SweepStorage) -> SweepLock:
    """Take ``sweep``'s lock for the rest of this process (`release_sweep_locks`, also at exit)."""
    lock = SweepLock(sweep)
    lock.acquire()
    _HELD.append(lock)
    return lock


def release_sweep_locks() -> None:
    """Release every lock `lock_sweep` took in this process."""
    while _HELD:
        _HELD.pop().release()


atexit.register(release_sweep_locks)


# ------------------------------------------------------------------------------------------- files


class VerifiedFiles:
    """Files already found good, by path, size and mtime, in one JSON file of the user cache: a second run
    checks only what is new or changed. Written atomically; two runs writing at once each leave a valid file."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self.known: dict[str, list[int]] = {}
        with suppress(OSError, ValueError, AttributeError):
            self.known = dict(json.loads(cache_file.read_text()).get("good", {}))
        self._changed = False

    @staticmethod
    def stamp(path: Path) -> list[int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]

    def is_known(self, path: Path, stamp: list[int] | None) -> bool:
        return stamp is not None and self.known.get(str(path)) == stamp

    def add(self, path: Path, stamp: list[int]) -> None:
        self.known[str(path)] = stamp
        self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        text = json.dumps({"good": self.known}, sort_keys=True)
        try:
            atomic_write(self.cache_file, lambda tmp: tmp.write_text(text))
        except OSError as exc:  # a read-only cache costs the next run the check again, nothing more
            log.warning("could not write the check cache %s: %s", self.cache_file, exc)


def _cache_file(kind: str, key: str) -> Path:
    return user_cache_dir("preflight", f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def base_is_cached(config: BaseConfig, sweep: sweep_storage.SweepStorage) -> bool:
    """True when the sweep's storage already holds the finished base of ``config`` (nothing is built)."""
    return sweep_storage.exists(f"{sweep.base_dir(config.key())}/{META_FILE}")


def check_weights(config: BaseConfig, sweep: sweep_storage.SweepStorage | None = None) -> None:
    """``--weights``: the file the base build would read exists and, for a torchvision file (its name carries
    the first hex digits of its sha256), matches them. Skipped when ``sweep`` already holds the base."""
    if config.weights is None or (sweep is not None and base_is_cached(config, sweep)):
        return
    if config.weights != "imagenet":
        if not Path(config.weights).is_file():
            raise PreflightError(
                f"--weights {config.weights}: no such file. Pass a state-dict file of backbone "
                f"{config.backbone!r}, 'imagenet' (the cached ImageNet weights) or leave it out (random init)"
            )
        return
    try:
        path = imagenet_weights_path(config.backbone)
    except (WeightsNotFoundError, WeightsError) as exc:
        raise PreflightError(f"--weights imagenet: {exc}") from exc
    if not path.is_file():
        raise PreflightError(
            f"--weights imagenet: the ImageNet weights of {config.backbone} are not at {path}, and nothing is "
            f"downloaded at run time. On a machine with internet fetch {imagenet_weights_url(config.backbone)} "
            f"and copy the file to {path} (the folder is $TORCH_HOME/hub/checkpoints, by default "
            "~/.cache/torch/hub/checkpoints; on a cluster, on every node), or pass --weights <state-dict file>"
        )
    verified = VerifiedFiles(_cache_file("weights", str(path)))
    stamp = verified.stamp(path)
    if verified.is_known(path, stamp):
        return
    try:
        _check_hash_prefix(path)
    except WeightsError as exc:
        raise PreflightError(f"--weights imagenet: {exc}") from exc
    if stamp is not None:
        verified.add(path, stamp)
        verified.save()


def check_whitening(config: BaseConfig, train: RetrievalDataset) -> None:
    """PCA whitening has at most ``n_images - 1`` components on ``n_images`` training vectors
    (trainables/netvlad/whitening.py; the ``K * D`` bound is the model config's own check)."""
    if config.whitening_dim is None:
        return
    n = len(train.image_paths())
    if config.whitening_dim > n - 1:
        raise PreflightError(
            f"--whitening-dim {config.whitening_dim}: PCA whitening learned on the {n} images of the training "
            f"split {train.name} has at most n - 1 = {n - 1} components. Pass --whitening-dim {max(n - 1, 0)} or "
            "less (0 for no whitening), or train on a set with more images"
        )


#: The decoder of `check_images` (the same reduced-scale decode `ImageListDataset` uses to skip bad files).
_decodable = is_readable


@dataclass(frozen=True)
class ImageCheck:
    """What `check_images` did: images looked at, how many it had to decode (the rest were known good)."""

    total: int
    decoded: int


def _image_paths(dataset: RetrievalDataset) -> list[Path]:
    # Revisited sets keep their queries out of the database: both lists.
    return [*dataset.image_paths(), *dataset.query_paths()]


def check_images(datasets: Iterable[RetrievalDataset], show_progress: bool = True) -> ImageCheck:
    """Every image of every split decodes, or `PreflightError` naming the bad ones. Decoded in a thread pool
    (PIL releases the GIL while it decodes); files found good are remembered per dataset folder in the user
    cache by path, size and mtime, so a second run decodes nothing it decoded before."""
    by_root: dict[Path, tuple[RetrievalDataset, dict[Path, None]]] = {}
    for ds in datasets:  # a split read twice (paris6k trains and validates) is checked once
        by_root.setdefault(ds.root, (ds, {}))[1].update(dict.fromkeys(_image_paths(ds)))
    total = decoded = 0
    bad: list[tuple[RetrievalDataset, Path, str]] = []
    for root, (ds, unique) in by_root.items():
        paths = list(unique)
        verified = VerifiedFiles(_cache_file("images", str(Path(root).resolve())))
        stamps = {p: verified.stamp(p) for p in paths}
        todo = [p for p in paths if not verified.is_known(p, stamps[p])]
        total += len(paths)
        decoded += len(todo)
        workers = min(32, 2 * (os.cpu_count() or 1))
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            progress(
                f"checking images of {ds.name}",
                total=len(todo),
                unit="img",
                enabled=show_progress and len(todo) >= 500,
            ) as bar,
        ):
            for path, ok in zip(todo, pool.map(_decodable, todo)):
                bar.update(1)
                stamp = stamps[path]
                if ok and stamp is not None:
                    verified.add(path, stamp)
                elif not ok:
                    why = "missing" if stamp is None else "0 bytes" if stamp[0] == 0 else "cannot be decoded"
                    bad.append((ds, path, why))
        verified.save()
        log.info(
            "images of %s: %d decoded now, %d known good from the check cache",
            ds.name,
            len(todo),
            len(paths) - len(todo),
        )
    if bad:
        shown = "\n".join(f"  - {path} ({why})" for _, path, why in bad[:_SHOW_FILES])
        more = f"\n  … and {len(bad) - _SHOW_FILES} more" if len(bad) > _SHOW_FILES else ""
        fixes = "\n".join(sorted({f"  {ds.name}: " + _how_to_get(ds.name, ds.root) for ds, _, _ in bad}))
        raise PreflightError(
            f"{len(bad)} of {total} images cannot be read (empty, truncated or not an image), and the sweep would "
            f"fail when it reached them:\n{shown}{more}\nReplace each with a good copy, or delete it (a database "
            f"image that no ground-truth file names is then left out of the set; one that is named is reported "
            f"missing):\n{fixes}"
        )
    return ImageCheck(total, decoded)


def check_base_inputs(config: BaseConfig, show_progress: bool = True) -> None:
    """What the base build and the trials read, checked before Ray starts: the whitening dimension against the
    training split, and every image of every split."""
    train = load_dataset(config.train_split, config.data_root)
    check_whitening(config, train)
    check_images(
        [train, *(load_dataset(name, config.data_root) for name in config.eval_splits)], show_progress
    )
