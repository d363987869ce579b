"""Release a model from a finished sweep: list its Pareto front, pick a member, register it in the MLflow registry.

    python -m sweep.release --mlflow-uri URI --experiment NAME [--parent-run-id ID]
        [--list | --max-map-drop X | --max-memory-mib M | --run-id ID] [--name MODEL] [--alias release] [--force]
        [--sign KEYFILE]

The sweep is read back from MLflow in the layout `sweep.tracking` writes: the parent run (tag
``vladsweep.role = sweep``; the latest one of the experiment unless ``--parent-run-id``; metrics: the base's mAP on
validation and test, and the baselines ``baseline_<name>_val``), its child runs (one per trial: metrics
``val_mAP``, ``test_mAP``, ``val_mAP_drop``, ``test_mAP_drop``, ``memory_mib``, …; tags ``status`` and ``pareto``)
and, for front members, the compressed file under ``model/``.

Every decision reads validation only — the front (the ``pareto`` tag), the picks, the baseline check; the test
split's mAP and drop are shown beside, never used to choose. Picks:

- ``--max-map-drop X`` (``0.02`` or ``2%``): the smallest front member whose relative val-mAP drop from the base is
  ≤ X;
- ``--max-memory-mib M``: the front member with the best val mAP within M MiB;
- ``--run-id ID``: that trial; refused (with the front members that dominate it) unless ``--force`` when it is not
  on the front.

Whatever the pick, a trial whose val mAP is below the best zero-byte baseline (random ranking, thumbnails, colour
histogram: no model bytes at all) is refused unless ``--force``: no bytes would do better.

The chosen ``model/`` folder is downloaded and decoded once (a damaged file is never released), then registered as
a version of the registered model ``--name`` with the trial's metrics and config as tags, and ``--alias`` is pointed
at it. The last line printed is the ``models:/NAME@ALIAS`` URI that ``python -m trainables.serving --model``
serves. Without a pick the front is printed as a table.

The version records the file's sha256 (tag ``artifact_sha256``), which serving checks before it decodes the file.
``--sign KEYFILE`` (an ed25519 PEM private key the user keeps, docs/release.md) also writes a detached signature
over that sha256 as ``model/model.vlad.safetensors.sig`` in the trial's run, beside the file: the registry download
brings it along, and whoever copies the file out of MLflow copies it too. ``python -m trainables.serving
--verify-key PUBFILE`` refuses a file without a valid one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from sweep.pareto import dominates, non_dominated_mask
from sweep.tracking import (
    ARTIFACT_DIR,
    BASE_KEY,
    BASE_MAP_METRIC,
    BASE_MEMORY_METRIC,
    BASE_TEST_MAP_METRIC,
    PARENT_TAG,
    PARETO_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    STATUS_FINISHED,
    STATUS_TAG,
    TEST,
    TRIAL_ID_TAG,
    VAL,
    open_client,
    resolve_tracking_uri,
)
from trainables.base import train_image_size
from trainables.contract import (
    ARTIFACT_FILE,
    BASELINES,
    DROP_KEY,
    MAP_KEY,
    MEMORY_KEY,
    RATIO_KEY,
    TEST_DROP_KEY,
    TEST_MAP_KEY,
    ZERO_BYTE_BASELINES,
    baseline_metric,
)
from trainables.fileio import file_sha256
from trainables.serving.trust import (
    ARTIFACT_SHA256_TAG,
    SIGNED_BY_TAG,
    TrustError,
    key_fingerprint,
    load_private_key,
    sign_sha256,
    signature_path,
)

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_MODEL_NAME",
    "BASE_TEST_MAP_METRIC",
    "ReleaseError",
    "Sweep",
    "Trial",
    "below_baseline",
    "check_baseline",
    "dominating",
    "front_table",
    "main",
    "open_sweep",
    "parse_fraction",
    "pick_by_max_drop",
    "pick_by_max_memory",
    "pick_by_run_id",
    "register",
]

DEFAULT_MODEL_NAME = "vladsweep-netvlad"
DEFAULT_ALIAS = "release"
#: The compressed file of a front member, as `sweep.tracking` logs it in the trial's child run.
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{ARTIFACT_FILE}"
#: Bookkeeping params (the base model's cache key) left out of the table's config column, like ``*_steps``.
_NOT_CONFIG = (BASE_KEY,)
#: The base's settings a registered version is tagged with (``base.<key>``), besides ``base.train_image_size``.
RELEASE_BASE_TAGS = ("image_size", "backbone", "dataset")


class ReleaseError(RuntimeError):
    """The sweep, the pick or the registration cannot work; the message says why and what would."""


@dataclass
class Trial:
    """One child run of the sweep, as the release sees it."""

    run_id: str
    trial_id: str
    status: str
    pareto: bool
    metrics: dict[str, float]
    params: dict[str, str]
    artifact_uri: str
    base_map: float | None = None
    base_test_map: float | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == STATUS_FINISHED

    @property
    def map(self) -> float:
        """The objective: the mAP on the validation splits."""
        return self.metrics.get(MAP_KEY, math.nan)

    @property
    def test_map(self) -> float:
        """The mAP on the test splits, reported beside, never chosen on."""
        return self.metrics.get(TEST_MAP_KEY, math.nan)

    @property
    def memory_mib(self) -> float:
        return self.metrics.get(MEMORY_KEY, math.nan)

    @property
    def ratio(self) -> float:
        return self.metrics.get(RATIO_KEY, math.nan)

    @property
    def map_drop(self) -> float:
        """Relative val-mAP drop from the base (0.02 = 2 %), as the trial logged it or from the parent's base mAP."""
        return _drop(self.metrics.get(DROP_KEY), self.map, self.base_map)

    @property
    def test_drop(self) -> float:
        """Relative test-mAP drop from the base on the test splits, likewise."""
        return _drop(self.metrics.get(TEST_DROP_KEY), self.test_map, self.base_test_map)

    def point(self) -> dict[str, Any]:
        """The row `sweep.pareto` reads."""
        return {
            "status": "ok" if self.finished else self.status.lower(),
            MAP_KEY: self.map,
            MEMORY_KEY: self.memory_mib,
        }

    def summary(self) -> str:
        return (
            f"trial {self.trial_id} (run {self.run_id}): {MAP_KEY} {self.map:.4f} (test {_num(self.test_map)}), "
            f"drop {_pct(self.map_drop)} (test {_pct(self.test_drop)}), {self.memory_mib:.4f} MiB"
        )


def _drop(logged: float | None, value: float, base: float | None) -> float:
    if logged is not None:
        return logged
    if base and base > 0:
        return (base - value) / base
    return math.nan


@dataclass
class Sweep:
    """A sweep read back from MLflow: its parent run and its trials (child runs)."""

    experiment_id: str
    experiment_name: str
    parent_run_id: str
    name: str
    status: str
    tracking_uri: str
    trials: list[Trial] = field(default_factory=list)
    base_map: float | None = None
    base_test_map: float | None = None
    base_memory_mib: float | None = None
    #: name -> mAP on the validation (``baselines``) and test (``test_baselines``) splits, as the parent logged them.
    baselines: dict[str, float] = field(default_factory=dict)
    test_baselines: dict[str, float] = field(default_factory=dict)

    @property
    def best_baseline(self) -> tuple[str, float] | None:
        """``(name, val mAP)`` of the best zero-byte baseline the parent logged, or None (a sweep logged before
        baselines existed). The rule of ``trainables.contract.best_zero_byte_baseline``, over the ones logged."""
        zero_byte = {n: v for n, v in self.baselines.items() if n in ZERO_BYTE_BASELINES and math.isfinite(v)}
        if not zero_byte:
            return None
        name = max(zero_byte, key=lambda n: zero_byte[n])
        return name, zero_byte[name]

    @property
    def front(self) -> list[Trial]:
        """Front members (tag ``pareto = true``, finished), smallest first."""
        return sorted(
            (t for t in self.trials if t.pareto and t.finished), key=lambda t: (t.memory_mib, -t.map)
        )

    def trial(self, run_id: str) -> Trial | None:
        return next((t for t in self.trials if t.run_id == run_id), None)


def _short(value: str) -> str:
    """A param for the table: floats to 4 significant digits (MLflow keeps every digit), the rest as logged."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value and "e" not in value.lower() else f"{number:.4g}"


def _num(x: float | None) -> str:
    return "unknown" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _pct(x: float) -> str:
    return f"{x:.1%}" if math.isfinite(x) else "n/a"


def check_store(tracking_uri: str) -> str:
    """The absolute form of ``tracking_uri``; a sqlite store must already exist (a release reads a sweep)."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise ReleaseError(
                f"--mlflow-uri {tracking_uri}: no MLflow store at {path}. Pass the --mlflow-uri the sweep logged to "
                "(sweep/run.py's default is sqlite:///mlflow.db in the folder it ran in)."
            )
    return uri


def open_sweep(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> Sweep:
    """Read the sweep: the experiment's latest sweep parent run (or ``parent_run_id``) and its trials."""
    client = open_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments(max_results=50)]
        raise ReleaseError(
            f"--experiment {experiment!r}: no such experiment in {tracking_uri}. Known: {', '.join(known) or 'none'}"
        )
    if parent_run_id is None:
        parents = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise ReleaseError(
                f"experiment {experiment!r} has no sweep (no parent run tagged {ROLE_TAG} = '{ROLE_SWEEP}'). Run "
                f"`python sweep/run.py --experiment {experiment} --mlflow-uri {tracking_uri}` first."
            )
        parent = parents[0]
    else:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as exc:
            raise ReleaseError(f"--parent-run-id {parent_run_id}: no such run in {tracking_uri}") from exc
        if parent.info.experiment_id != exp.experiment_id or parent.data.tags.get(ROLE_TAG) != ROLE_SWEEP:
            raise ReleaseError(
                f"--parent-run-id {parent_run_id}: not a sweep parent run of experiment {experiment!r} (its "
                f"experiment id is {parent.info.experiment_id}, tag {ROLE_TAG} = "
                f"{parent.data.tags.get(ROLE_TAG)!r}); list sweeps in the MLflow UI or leave it out for the latest"
            )
    pid = parent.info.run_id
    metrics = parent.data.metrics
    base_map, base_test_map = metrics.get(BASE_MAP_METRIC), metrics.get(BASE_TEST_MAP_METRIC)
    sweep = Sweep(
        experiment_id=exp.experiment_id,
        experiment_name=experiment,
        parent_run_id=pid,
        name=parent.info.run_name or pid,
        status=parent.info.status,
        tracking_uri=tracking_uri,
        base_map=base_map,
        base_test_map=base_test_map,
        base_memory_mib=metrics.get(BASE_MEMORY_METRIC),
        baselines={n: metrics[k] for n in BASELINES if (k := baseline_metric(n, VAL)) in metrics},
        test_baselines={n: metrics[k] for n in BASELINES if (k := baseline_metric(n, TEST)) in metrics},
    )
    page_token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{pid}'",
            max_results=1000,
            page_token=page_token,
        )
        for run in page:
            tags = run.data.tags
            sweep.trials.append(
                Trial(
                    run_id=run.info.run_id,
                    trial_id=tags.get(TRIAL_ID_TAG, run.info.run_name or run.info.run_id),
                    status=tags.get(STATUS_TAG, run.info.status),
                    pareto=tags.get(PARETO_TAG) == "true",
                    metrics=dict(run.data.metrics),
                    params=dict(run.data.params),
                    artifact_uri=run.info.artifact_uri,
                    base_map=base_map,
                    base_test_map=base_test_map,
                    tags=dict(tags),
                )
            )
        page_token = page.token
        if not page_token:
            break
    return sweep


def _require_front(sweep: Sweep) -> list[Trial]:
    front = sweep.front
    if not front:
        reconciled = any(PARETO_TAG in t.tags for t in sweep.trials)
        raise ReleaseError(
            f"sweep {sweep.name!r} (parent run {sweep.parent_run_id}) has no finished trial on its Pareto front "
            f"({len(sweep.trials)} trials{'' if reconciled else '; none tagged pareto yet'}). Let the sweep finish, "
            "or log it again with `python sweep/run.py --sync --name NAME --storage DIR`."
        )
    return front


def parse_fraction(text: str) -> float:
    """``"0.02"`` or ``"2%"`` -> 0.02; a bare number above 1 is refused (write ``2%`` for two percent)."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1].strip() if percent else raw)
    except ValueError:
        raise ReleaseError(
            f"--max-map-drop {text!r}: expected a fraction like 0.02 or a percentage like 2%"
        ) from None
    if percent:
        value /= 100.0
    if not math.isfinite(value) or value < 0:
        raise ReleaseError(f"--max-map-drop {text!r}: must be a drop ≥ 0 (0.02 or 2%)")
    if value > 1 and not percent:
        raise ReleaseError(
            f"--max-map-drop {text!r}: a fraction is at most 1; for {raw} percent write {raw}%"
        )
    return value


def _candidates(trials: Sequence[Trial], key, n: int = 3) -> str:
    return "\n".join(f"  {t.summary()}" for t in sorted(trials, key=key)[:n])


def pick_by_max_drop(sweep: Sweep, max_drop: float) -> Trial:
    """The smallest front member whose relative val-mAP drop is ≤ ``max_drop`` (ties: the better val mAP)."""
    front = _require_front(sweep)
    # The drop is a ratio of two logged floats: "25%" must admit a trial whose drop prints as 25.0% but computed to
    # 0.25000000000000006.
    ok = [t for t in front if math.isfinite(t.map_drop) and t.map_drop <= max_drop + 1e-9]
    if not ok:
        raise ReleaseError(
            f"no trial on the front of sweep {sweep.name!r} loses at most {_pct(max_drop)} {MAP_KEY} (base "
            f"{MAP_KEY} {_num(sweep.base_map)}). Closest:\n{_candidates(front, key=lambda t: t.map_drop)}\n"
            "Allow a larger --max-map-drop, or pick one with --run-id."
        )
    return min(ok, key=lambda t: (t.memory_mib, -t.map))


def pick_by_max_memory(sweep: Sweep, max_mib: float) -> Trial:
    """The front member with the best val mAP within ``max_mib`` MiB (ties: the smaller file)."""
    front = _require_front(sweep)
    ok = [t for t in front if t.memory_mib <= max_mib]
    if not ok:
        raise ReleaseError(
            f"no trial on the front of sweep {sweep.name!r} fits in {max_mib} MiB. Smallest:\n"
            f"{_candidates(front, key=lambda t: t.memory_mib)}\nAllow a larger --max-memory-mib, or pick one "
            "with --run-id."
        )
    return max(ok, key=lambda t: (t.map, -t.memory_mib))


def dominating(trial: Trial, sweep: Sweep) -> list[Trial]:
    """Finished trials that dominate ``trial`` (`sweep.pareto.dominates`: at least as good on every objective,
    better on one); front members first."""
    mine = trial.point()
    out = [t for t in sweep.trials if t.run_id != trial.run_id and dominates(t.point(), mine)]
    return sorted(out, key=lambda t: (not t.pareto, t.memory_mib, -t.map))


def pick_by_run_id(sweep: Sweep, run_id: str, force: bool = False) -> Trial:
    """That trial of the sweep; one off the front only with ``force`` (the error names who dominates it)."""
    trial = sweep.trial(run_id)
    if trial is None:
        by_trial_id = next((t for t in sweep.trials if t.trial_id == run_id), None)
        hint = f" (that is the trial id of run {by_trial_id.run_id})" if by_trial_id else ""
        raise ReleaseError(
            f"--run-id {run_id}: not a trial of sweep {sweep.name!r} (parent run {sweep.parent_run_id}){hint}. "
            "`--list` shows the front with its run ids."
        )
    if not trial.finished:
        raise ReleaseError(
            f"--run-id {run_id}: trial {trial.trial_id} has status {trial.status}; only a finished trial can be released"
        )
    if not (math.isfinite(trial.map) and math.isfinite(trial.memory_mib)):
        raise ReleaseError(
            f"--run-id {run_id}: trial {trial.trial_id} has no finite mAP / memory_mib metrics"
        )
    if trial.pareto:
        return trial
    better = dominating(trial, sweep)
    if better:
        reason = "it is dominated by " + "; ".join(t.summary() for t in better[:3])
    else:
        on_front = non_dominated_mask([t.point() for t in sweep.trials])[sweep.trials.index(trial)]
        reason = "it is not tagged pareto=true" + (
            " (its metrics would put it on the front now: log the sweep again with --sync)"
            if on_front
            else ""
        )
    if not force:
        raise ReleaseError(
            f"--run-id {run_id}: {trial.summary()} is not on the Pareto front: {reason}. Pass --force to release "
            "it anyway."
        )
    print(f"warning: releasing a trial off the front (--force): {reason}", file=sys.stderr)
    return trial


def below_baseline(sweep: Sweep, trial: Trial) -> bool:
    """Whether ``trial``'s val mAP is below the sweep's best zero-byte baseline (False without baselines)."""
    best = sweep.best_baseline
    return best is not None and math.isfinite(trial.map) and trial.map < best[1]


def check_baseline(sweep: Sweep, trial: Trial, force: bool = False) -> None:
    """Refuse ``trial`` when its val mAP is below the best zero-byte baseline, unless ``force`` (then warn)."""
    if not below_baseline(sweep, trial):
        return
    name, value = sweep.best_baseline
    reason = (
        f"{trial.summary()} scores below the best zero-byte baseline: {MAP_KEY} {trial.map:.4f} < {value:.4f} for "
        f"{name}, which needs no model bytes at all"
    )
    if not force:
        raise ReleaseError(
            f"{reason}. Pick a trial above it (--list marks the front members below it), or pass --force to "
            "release it anyway."
        )
    print(
        f"warning: releasing a trial below the best zero-byte baseline (--force): {reason}", file=sys.stderr
    )


def _key_params(sweep: Sweep) -> list[str]:
    """Params that differ between the sweep's trials (what the search chose), else every param."""
    names = sorted(
        {k for t in sweep.trials for k in t.params if k not in _NOT_CONFIG and not k.endswith("_steps")}
    )
    varying = [k for k in names if len({t.params.get(k) for t in sweep.trials}) > 1]
    return varying or names


def _cell(x: float | None, width: int) -> str:
    return f"{_num(x) if x is not None and math.isfinite(x) else '—':>{width}}"


def front_table(sweep: Sweep) -> str:
    """The front as a text table, smallest file first: the base model and the baselines on top, val mAP (what
    every decision reads) with test mAP beside, and a mark on front members below the best zero-byte baseline."""
    front = sweep.front
    done = sum(t.finished for t in sweep.trials)
    lines = [
        f"sweep {sweep.name!r}: parent run {sweep.parent_run_id} in experiment {sweep.experiment_name!r} "
        f"({sweep.status}); {len(sweep.trials)} trials, {done} finished, {len(front)} on the Pareto front",
    ]
    keys = _key_params(sweep)
    header = (
        f"{'run_id':<34}{'trial':<14}{'memory_mib':>11}{'ratio':>8}{MAP_KEY:>9}{'val_drop':>10}"
        f"{TEST_MAP_KEY:>10}{'test_drop':>11}  config"
    )
    lines += [header, "-" * len(header)]
    if sweep.base_map is not None and sweep.base_memory_mib is not None:
        lines.append(
            f"{'(base model)':<34}{'':<14}{sweep.base_memory_mib:>11.4f}{1.0:>8.1f}{sweep.base_map:>9.4f}"
            f"{_pct(0.0):>10}{_cell(sweep.base_test_map, 10)}{_pct(0.0):>11}  dense fp32"
        )
    best = sweep.best_baseline
    for name, value in sweep.baselines.items():
        kind = (
            "zero-byte baseline" if name in ZERO_BYTE_BASELINES else "baseline (the network, not fine-tuned)"
        )
        mark = ", the best zero-byte" if best and name == best[0] else ""
        lines.append(
            f"{f'({name})':<34}{'':<14}{'':>11}{'':>8}{value:>9.4f}{'':>10}"
            f"{_cell(sweep.test_baselines.get(name), 10)}{'':>11}  {kind}{mark}"
        )
    for t in front:
        config = " ".join(f"{k}={_short(t.params[k])}" for k in keys if k in t.params)
        mark = f"BELOW {best[0]}  " if below_baseline(sweep, t) else ""
        lines.append(
            f"{t.run_id:<34}{t.trial_id:<14}{t.memory_mib:>11.4f}{t.ratio:>8.1f}{t.map:>9.4f}"
            f"{_pct(t.map_drop):>10}{_cell(t.test_map, 10)}{_pct(t.test_drop):>11}  {mark}{config}"
        )
    if best:
        n_below = sum(below_baseline(sweep, t) for t in front)
        lines.append(
            f"\nselection reads {MAP_KEY} only; {TEST_MAP_KEY} is shown beside. Best zero-byte baseline: {best[0]} "
            f"({MAP_KEY} {best[1]:.4f}); {n_below} front member{'s' if n_below != 1 else ''} below it (marked "
            "BELOW), which a release refuses without --force."
        )
    else:
        lines.append(f"\nselection reads {MAP_KEY} only; {TEST_MAP_KEY} is shown beside.")
    return "\n".join(lines)


def _fetch_and_check(client, trial: Trial, work: Path) -> tuple[Path, str, dict[str, Any]]:
    """Download the trial's ``model/`` file, decode it whole (checksums, architecture), and return
    ``(path, sha256, header meta)``: a release never points at a file that does not load."""
    # Lazy: the codec brings torch (seconds of start-up), which listing a front or a refused pick never needs.
    from trainables.compression.codec import CodecError, load_compressed

    names = [a.path for a in client.list_artifacts(trial.run_id, ARTIFACT_DIR)]
    if ARTIFACT_PATH not in names:
        raise ReleaseError(
            f"{trial.summary()} has no {ARTIFACT_PATH} artifact (it has: {', '.join(names) or 'none'}). "
            "Only front members get their file logged; run `python sweep/run.py --sync …` if the sweep's MLflow "
            "record is incomplete."
        )
    local = Path(
        download_artifacts(
            run_id=trial.run_id,
            artifact_path=ARTIFACT_PATH,
            dst_path=str(work),
            tracking_uri=client.tracking_uri,
        )
    )
    try:
        model = load_compressed(local)
    except CodecError as exc:
        raise ReleaseError(
            f"{trial.summary()}: its artifact does not load, refusing to release it: {exc}"
        ) from exc
    return local, file_sha256(local), dict(model.compression_meta.get("meta", {}))


def _tag(value: Any) -> str:
    return str(value)[:5000]  # MLflow's limit on a tag value


def _write_signature(client, trial: Trial, key, sha: str, work: Path) -> str:
    """Log the detached signature of the file (sha256 ``sha``) beside it in the trial's ``model/`` folder, the
    version's source; returns its artifact path."""
    sig = signature_path(work / "signature" / ARTIFACT_FILE)
    sig.parent.mkdir()
    sig.write_bytes(sign_sha256(key, sha))
    client.log_artifact(trial.run_id, str(sig), artifact_path=ARTIFACT_DIR)
    return f"{ARTIFACT_DIR}/{sig.name}"


def register(
    sweep: Sweep,
    trial: Trial,
    name: str = DEFAULT_MODEL_NAME,
    alias: str = DEFAULT_ALIAS,
    forced: bool = False,
    sign: str | os.PathLike | None = None,
):
    """Register ``trial``'s ``model/`` folder as a version of ``name`` (reusing the version when this run is already
    registered there), point ``alias`` at it, and return the ``ModelVersion``. With ``sign`` (an ed25519 PEM
    private key file), also write the file's detached signature beside it (`trainables.serving.trust`)."""
    # The key first: a bad one fails before anything is downloaded or written.
    try:
        key = load_private_key(sign) if sign is not None else None
    except TrustError as exc:
        raise ReleaseError(f"--sign: {exc}") from exc
    client = open_client(sweep.tracking_uri)
    below = below_baseline(sweep, trial)
    source = f"{trial.artifact_uri.rstrip('/')}/{ARTIFACT_DIR}"
    with tempfile.TemporaryDirectory(prefix="vladsweep-release-") as work:
        _, sha, meta = _fetch_and_check(client, trial, Path(work))
        existing = [
            mv
            for mv in client.search_model_versions(f"name = '{name}' and run_id = '{trial.run_id}'")
            if mv.source == source
        ]
        latest = max(existing, key=lambda mv: int(mv.version)) if existing else None
        recorded = latest.tags.get(ARTIFACT_SHA256_TAG) if latest else None
        if recorded and recorded != sha:
            # Moving an alias to (or signing) a version must not bless a file that changed since it was registered.
            raise ReleaseError(
                f"{trial.summary()}: its file now has sha256 {sha}, but version {latest.version} of {name!r} "
                f"recorded {recorded}: the file changed after its release; refusing to release it again"
            )
        signed = _write_signature(client, trial, key, sha, Path(work)) if key is not None else None
    if signed:
        print(f"signed: {signed} ({key_fingerprint(key)}, over sha256 {sha})")
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name, description="Compressed NetVLAD models released from vladsweep sweeps (sweep.release)."
            )
        except MlflowException:  # created by a concurrent release in between: fine
            client.get_registered_model(name)
    if latest is not None:
        version = latest
        print(f"run {trial.run_id} is already version {version.version} of {name!r}; moving the alias only")
        if key is not None:
            client.set_model_version_tag(name, version.version, SIGNED_BY_TAG, key_fingerprint(key))
    else:
        base = meta.get("base", {}) if isinstance(meta.get("base"), dict) else {}
        tags = {
            TRIAL_ID_TAG: trial.trial_id,
            "sweep": sweep.name,
            "sweep_parent_run_id": sweep.parent_run_id,
            "experiment": sweep.experiment_name,
            "artifact": ARTIFACT_PATH,
            ARTIFACT_SHA256_TAG: sha,
            PARETO_TAG: "true" if trial.pareto else "false",
            "below_zero_byte_baseline": "true" if below else "false",
            "forced": "true" if forced and (below or not trial.pareto) else "false",
            **{k: repr(float(v)) for k, v in sorted(trial.metrics.items())},
            **{f"config.{k}": v for k, v in sorted(trial.params.items())},
            **{f"base.{k}": v for k, v in sorted(base.items()) if k in RELEASE_BASE_TAGS},
            # The size the model was fine-tuned at, which serving at another size should know about.
            **({"base.train_image_size": str(train_image_size(base))} if "image_size" in base else {}),
        }
        if sweep.base_map is not None:
            tags[BASE_MAP_METRIC] = repr(float(sweep.base_map))
        if sweep.base_test_map is not None:
            tags[BASE_TEST_MAP_METRIC] = repr(float(sweep.base_test_map))
        if key is not None:
            tags[SIGNED_BY_TAG] = key_fingerprint(key)
        if sweep.best_baseline:
            tags["best_zero_byte_baseline"] = f"{sweep.best_baseline[0]}={sweep.best_baseline[1]!r}"
        version = client.create_model_version(
            name,
            source=source,
            run_id=trial.run_id,
            tags={k: _tag(v) for k, v in tags.items()},
            description=(
                f"trial {trial.trial_id} of sweep {sweep.name}: {MAP_KEY} {trial.map:.4f} (drop "
                f"{_pct(trial.map_drop)}), {TEST_MAP_KEY} {_num(trial.test_map)} (drop {_pct(trial.test_drop)}), "
                f"{trial.memory_mib:.4f} MiB ({trial.ratio:.1f}x smaller than dense fp32)"
            ),
        )
    client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep.release",
        description="List a sweep's Pareto front, pick a model from it and register it in the MLflow registry.",
    )
    p.add_argument("--mlflow-uri", default="sqlite:///mlflow.db", help="the sweep's MLflow tracking URI")
    p.add_argument("--experiment", default="vladsweep", help="MLflow experiment of the sweep")
    p.add_argument("--parent-run-id", default=None, help="the sweep's parent run (default: the latest sweep)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument(
        "--list", action="store_true", help="print the front and exit (the default without a pick)"
    )
    pick.add_argument(
        "--max-map-drop",
        metavar="X",
        help=f"smallest model losing at most X of the base's {MAP_KEY} (0.02 or 2%%)",
    )
    pick.add_argument("--max-memory-mib", metavar="M", type=float, help=f"best {MAP_KEY} within M MiB")
    pick.add_argument("--run-id", help="this trial's child run")
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help="registered model name")
    p.add_argument("--alias", default=DEFAULT_ALIAS, help="alias to point at the new version")
    p.add_argument(
        "--force",
        action="store_true",
        help="release a --run-id that is not on the front, or a trial below the best zero-byte baseline",
    )
    p.add_argument(
        "--sign",
        metavar="KEYFILE",
        default=None,
        help="ed25519 PEM private key: write the file's detached signature beside it (model/…safetensors.sig) "
        "for `python -m trainables.serving --verify-key` (docs/release.md)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module doc); 0 on success, 2 with ``error: …`` on stderr otherwise."""
    args = build_parser().parse_args(argv)
    # One small file: MLflow's download progress bar is noise in a command's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = check_store(args.mlflow_uri)
        sweep = open_sweep(uri, args.experiment, args.parent_run_id)
        if sweep.status == "RUNNING":
            print(f"warning: sweep {sweep.name!r} is still running; its front may change", file=sys.stderr)
        if args.max_map_drop is not None:
            trial = pick_by_max_drop(sweep, parse_fraction(args.max_map_drop))
        elif args.max_memory_mib is not None:
            if not args.max_memory_mib > 0:
                raise ReleaseError(f"--max-memory-mib {args.max_memory_mib}: must be a size > 0 in MiB")
            trial = pick_by_max_memory(sweep, args.max_memory_mib)
        elif args.run_id is not None:
            trial = pick_by_run_id(sweep, args.run_id, force=args.force)
        else:
            print(front_table(sweep))
            print("\npick one: --max-map-drop 2% | --max-memory-mib M | --run-id RUN_ID")
            return 0
        check_baseline(sweep, trial, force=args.force)
        version = register(sweep, trial, args.name, args.alias, forced=args.force, sign=args.sign)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: MLflow at {args.mlflow_uri}: {exc.message}", file=sys.stderr)
        return 2
    model_uri = f"models:/{args.name}@{args.alias}"
    print(
        f"released {trial.summary()}\n  as version {version.version} of registered model {args.name!r} "
        f"(alias {args.alias!r}); source {version.source}\n"
        f"  serve:    python -m trainables.serving --model {model_uri} --mlflow-uri {uri} "
        "--database DIR --query IMAGE\n"
        f"  evaluate: python -m trainables.serving --model {model_uri} --mlflow-uri {uri} "
        "--evaluate DATASET\n"
        f"{model_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
