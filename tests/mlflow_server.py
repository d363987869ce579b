"""A real ``mlflow server`` process for tests: started on 127.0.0.1 at a free port over a given store, stopped after.

Used by the browser test of the MLflow UI. The server runs as the user runs it (``mlflow server
--backend-store-uri sqlite:///… --host 127.0.0.1``), in its own process group so that stopping it also ends
the worker processes it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Starting the server imports all of MLflow and migrates the store: ~20 s on an idle 2-core machine, more when
#: other jobs share it.
START_TIMEOUT_S = 240.0


@dataclass
class MlflowServer:
    """A running server: its base URL (no trailing slash), process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_command() -> list[str]:
    # The console script beside this interpreter, so the server runs the same MLflow as the tests.
    script = Path(sys.executable).with_name("mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200 and response.read().strip() == b"OK"
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # Only the group this helper started (start_new_session=True makes the server its leader).
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    log_path: Path,
    artifact_root: Path | None = None,
    cwd: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` over ``backend_store_uri`` until the block ends; waits until ``/health`` says OK.

    ``artifact_root`` becomes ``--default-artifact-root`` (where runs of *new* experiments keep artifacts; runs
    that exist keep the artifact URI recorded in the store). Raises ``RuntimeError`` with the server's log when
    it exits or does not answer within ``timeout_s``.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *_mlflow_command(),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifact_root is not None:
        command += ["--default-artifact-root", str(artifact_root)]
    # No telemetry: test machines have no internet and must not try to reach it.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = MlflowServer(url, process, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"`{' '.join(command)}` exited with {process.returncode} before answering {url}/health:\n"
                    + server.log_tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"`{' '.join(command)}` did not answer {url}/health within {timeout_s:.0f} s:\n"
                    + server.log_tail()
                )
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)
