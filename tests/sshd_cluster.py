"""A private sshd on 127.0.0.1 that stands in for a cluster host, so `ray up/submit/exec/down` run for real here.

`sshd_host()` makes a temp folder with a host key, a client key, authorized_keys and an sshd_config (loopback only,
a free port, keys only), starts `sshd -D` and yields an `SshdHost`. The ssh user's HOME and Ray's temp folder on the
"head" live in that folder (sshd's `SetEnv`), so nothing Ray writes there escapes it; the CLI side gets the same
`RAY_TMPDIR` because the local provider keeps its state file there. `SshdHost.cluster_config()` turns
cluster/local.yaml into a file for this host, changing only what must differ here (docs/traps.md#ray-up-on-one-machine).

`ray stop` (run by head_start_ray_commands and by `ray down`) stops every Ray process of a host. This machine is
shared with other Ray users (other tests, other sessions), so the head's PATH starts with a stand-in `ray` whose
`stop` ends only the Ray processes carrying this host's `RAY_TMPDIR`; every other subcommand is the real `ray`.

On exit it closes Ray's ssh ControlMaster sockets for the cluster, stops sshd and ends every process still
carrying its `RAY_TMPDIR` (the Ray head and MLflow started over ssh), then removes the folder.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from net import free_port

REPO = Path(__file__).resolve().parents[1]
# program -> the Debian package that has it
TOOLS = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",  # Ray copies file_mounts and the submitted script with it
    "nc": "netcat-openbsd",  # ssh_proxy_command: Ray's auth block has no ssh_port
}

# The stand-in `ray` on the test head's PATH (see the module docstring): `ray stop` scoped to this host's processes.
RAY_SHIM = """#!{python}
import os, sys, time
if sys.argv[1:2] != ["stop"]:
    os.execv({ray!r}, [{ray!r}, *sys.argv[1:]])
import ray._common.utils
from ray.autoscaler._private.constants import RAY_PROCESSES  # importing ray puts its bundled psutil on sys.path
import psutil

marker = "RAY_TMPDIR=" + os.environ["RAY_TMPDIR"]
mine = []
for proc in psutil.process_iter(["name", "cmdline"]):
    try:
        if marker in ("%s=%s" % kv for kv in proc.environ().items()):
            mine.append((proc, proc.info["name"] or "", " ".join(proc.info["cmdline"] or [])))
    except psutil.Error:
        pass

def running(proc):
    try:  # a zombie is gone for our purpose: its parent, not us, reaps it
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

# As `ray stop` does: the raylet first, then the other Ray processes, the GCS last, each waited for.
buckets = [RAY_PROCESSES[:1], RAY_PROCESSES[1:-1], RAY_PROCESSES[-1:]]
stopped = 0
for bucket in buckets:
    found = [p for p, name, args in mine if any(k in (name if by_name else args) for k, by_name in bucket)]
    for proc in found:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 5
    alive = found
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [proc for proc in alive if running(proc)]
    for proc in alive:
        try:
            print("test ray stop: SIGKILL to", proc.pid, " ".join(proc.cmdline())[:100], file=sys.stderr)
            proc.kill()
        except psutil.Error:
            pass
    stopped += len(found)
ray._common.utils.reset_ray_address()
print("test ray stop: stopped %d Ray processes of this test host" % stopped)
"""


def missing_tools() -> list[str]:
    """The programs a real `ray up` over ssh needs that are not installed, as 'program (Debian package)'."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool, path=search) is None]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with code {proc.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout}s:\n{log.read_text()}")


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (IPv4 and IPv6), read from /proc/net."""
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port or len(address) != width:
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@dataclass
class SshdHost:
    """One loopback "host" reachable over ssh, and the `ray` CLI pointed at it."""

    root: Path
    port: int
    home: Path
    ray_tmpdir: Path
    client_key: Path
    user: str
    cluster_names: list[str] = field(default_factory=list)

    @property
    def cli_env(self) -> dict[str, str]:
        """Environment for the `ray` CLI: same RAY_TMPDIR as the head (the local provider's state file lives
        there), loopback-only Ray, no usage stats, temp files inside the host folder."""
        env = dict(os.environ)
        env.update(
            RAY_TMPDIR=str(self.ray_tmpdir),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
            TMPDIR=str(self.root / "clitmp"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def cluster_config(self, base: Path, cluster_name: str, **extra_env: str) -> dict:
        """cluster/local.yaml (or another local-provider file) adapted to this host.

        Changed, and only these: the provider (head 127.0.0.1, no workers), auth (this user, the test key, the
        sshd port through `ssh_proxy_command`: Ray's auth has no ssh_port), file_mount sources made absolute, the
        shared folder /mnt/shared/vladsweep moved into the temp folder, setup commands that install from the
        internet dropped (this machine's venv stands in: `~/venv` links to it), and in the head's `ray start` free
        ports, 127.0.0.1 and no dashboard. `extra_env` lines are appended to the node's environment file.
        """
        shared = self.root / "shared"
        text = base.read_text().replace("/mnt/shared/vladsweep", str(shared))
        config = yaml.safe_load(text)
        if config.get("provider", {}).get("type") != "local":
            raise ValueError(f"{base}: provider.type must be 'local' to run on an sshd host")
        config = copy.deepcopy(config)
        config["cluster_name"] = cluster_name
        config["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
        config["auth"] = {
            "ssh_user": self.user,
            "ssh_private_key": str(self.client_key),
            "ssh_proxy_command": f"nc 127.0.0.1 {self.port}",
        }
        config["file_mounts"] = {
            remote: str((REPO / local).resolve()) for remote, local in config["file_mounts"].items()
        }
        config["setup_commands"] = [c for c in config["setup_commands"] if not _installs(c)]
        extra_env = {"PATH": f"{self.root / 'shim'}:$PATH", **extra_env}
        env_lines = "".join(f"export {k}={v}\n" for k, v in extra_env.items())
        config["head_setup_commands"] = [c for c in config.get("head_setup_commands", []) if not _installs(c)]
        # Last of the head's setup (setup_commands + head_setup_commands), so these lines win.
        config["head_setup_commands"].append(f"printf '%s' {_sh_quote(env_lines)} >> ~/.vladsweep_env")
        config["worker_setup_commands"] = []
        ray_port = free_port()
        start_args = (
            f"--node-ip-address=127.0.0.1 --include-dashboard=false "
            f"--dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()}"
        )
        config["head_start_ray_commands"] = [
            c.replace("--port=6379", f"--port={ray_port}").replace(
                "ray start --head", f"ray start --head {start_args}"
            )
            for c in config["head_start_ray_commands"]
        ]
        self.cluster_names.append(cluster_name)
        return config

    def write_config(self, config: dict) -> Path:
        path = self.root / f"{config['cluster_name']}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the real `ray` CLI of this venv; output captured (stderr folded into stdout, in order)."""
        ray_bin = Path(sys.executable).parent / "ray"
        try:
            return subprocess.run(
                [str(ray_bin), *args],
                env=self.cli_env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(e.cmd, 124, out + f"\n[timed out after {timeout}s]", None)

    def diagnostics(self) -> str:
        """The logs that say why a `ray` command failed: sshd, MLflow and the head's Ray logs."""
        # syslogin lines: sshd cannot write wtmp for a session it did not log in through PAM; harmless.
        sshd_log = "\n".join(
            ln for ln in _tail(self.root / "sshd.log", 200).splitlines() if "syslogin" not in ln
        )
        parts = [f"--- sshd log ---\n{sshd_log}"]
        parts.append(f"--- MLflow server log ---\n{_tail(self.home / 'mlflow' / 'server.log')}")
        logs = self.ray_tmpdir / "ray" / "session_latest" / "logs"
        for name in ("monitor.log", "monitor.err", "raylet.err", "gcs_server.err"):
            tail = _tail(logs / name, 30)
            if tail:
                parts.append(f"--- {logs / name} ---\n{tail}")
        return "\n".join(parts)

    def close_control_masters(self) -> None:
        """Ray keeps one ssh ControlMaster per cluster under /tmp/ray_ssh_<user hash>/<cluster hash>; close ours
        (`ssh -O exit`) so no ssh client outlives sshd."""
        user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        for name in self.cluster_names:
            folder = Path(f"/tmp/ray_ssh_{user_hash}") / hashlib.sha256(name.encode()).hexdigest()[:10]
            if not folder.is_dir():
                continue
            for sock in folder.iterdir():
                subprocess.run(
                    ["ssh", "-O", "exit", "-o", f"ControlPath={sock}", f"{self.user}@127.0.0.1"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=15,
                )
            shutil.rmtree(folder, ignore_errors=True)

    def own_processes(self) -> list[int]:
        """Processes started through this host (their environment carries its RAY_TMPDIR), this one excluded."""
        marker = f"RAY_TMPDIR={self.ray_tmpdir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                pids.append(int(entry.name))
        return pids


def _installs(command: str) -> bool:
    """A setup command that installs software (uv, pip, the GPU faiss swap): this test host has no internet and
    already has the venv."""
    return any(word in command.split() for word in ("uv", "pip", "pip3"))


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _end_processes(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        time.sleep(0.2)
    for pid in alive:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except (OSError, IndexError):
        return True


def _sshd_config(root: Path, port: int, home: Path, ray_tmpdir: Path) -> str:
    return f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root / "ssh" / "host_ed25519"}
PidFile {root / "ssh" / "sshd.pid"}
AuthorizedKeysFile {root / "ssh" / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {getpass.getuser()}
UsePAM no
StrictModes no
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
SetEnv HOME={home} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_TMPDIR={ray_tmpdir}
"""


@contextmanager
def sshd_host() -> Iterator[SshdHost]:
    """Start a private sshd on 127.0.0.1 and yield the host; everything it started is ended on exit."""
    missing = missing_tools()
    if missing:
        raise RuntimeError("missing: " + ", ".join(missing))
    sshd = shutil.which("sshd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    # A short root: Ray's unix sockets live under RAY_TMPDIR and their paths must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="vsssh", dir="/tmp"))
    home, ray_tmpdir, keys = root / "home", root / "rtmp", root / "ssh"
    for d in (home, ray_tmpdir, keys, root / "clitmp", root / "shared"):
        d.mkdir(parents=True)
    # The nodes' venv (cluster/*.yaml put ~/venv/bin on PATH) is this machine's venv.
    (home / "venv").symlink_to(sys.prefix)
    shim = root / "shim" / "ray"
    shim.parent.mkdir()
    shim.write_text(RAY_SHIM.format(python=sys.executable, ray=str(Path(sys.prefix) / "bin" / "ray")))
    shim.chmod(0o755)
    for name in ("host_ed25519", "client_ed25519"):
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"vladsweep-test-{name}",
                "-f",
                keys / name,
            ],
            check=True,
            capture_output=True,
        )
    (keys / "authorized_keys").write_text((keys / "client_ed25519.pub").read_text())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(_sshd_config(root, port, home, ray_tmpdir))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    log = root / "sshd.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    host = SshdHost(root, port, home, ray_tmpdir, keys / "client_ed25519", getpass.getuser())
    try:
        _wait_for_port(port, proc, log)
        yield host
    finally:
        host.close_control_masters()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _end_processes(host.own_processes())
        shutil.rmtree(root, ignore_errors=True)
