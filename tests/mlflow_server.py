"""A real ``mlflow server`` process for tests: started on 127.0.0.1 at a free port, stopped by the test.

The one helper for every test that needs a real server (the MLflow UI browser test, the MLflow-outage fault test).
The server runs as a user runs it (``mlflow server --backend-store-uri sqlite:///… --host 127.0.0.1``), in its own
process group, so that stopping it also ends the worker processes it forks (uvicorn, the job runner) and nothing
else. ``restart()`` brings it back on the same port, so a client that kept the URL (a running sweep) finds it
again.

    with MlflowServer("sqlite:///…/mlflow.db", log_path) as server:   # started, answering /health
        client = mlflow.MlflowClient(server.url)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from net import LOOPBACK, free_port

#: Starting the server imports all of MLflow and migrates the store: ~20 s on an idle 2-core machine, more when
#: other jobs share it.
START_TIMEOUT_S = 240.0
#: How long a SIGTERMed server may take to exit before its process group is SIGKILLed.
STOP_TIMEOUT_S = 20.0


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


class MlflowServer:
    """``mlflow server`` over ``backend_store_uri`` on 127.0.0.1, at a port fixed when the object is made.

    ``artifact_root`` becomes ``--default-artifact-root`` (where runs of *new* experiments keep artifacts; runs
    that exist keep the artifact URI recorded in the store); ``artifacts_destination`` becomes
    ``--artifacts-destination`` (the server proxies artifact uploads into that folder). Output goes to
    ``log_path``: each start after the first appends to it under a ``--- start N ---`` line.
    """

    def __init__(
        self,
        backend_store_uri: str,
        log_path: Path,
        *,
        artifact_root: Path | None = None,
        artifacts_destination: Path | None = None,
        cwd: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.log_path = log_path
        self.artifact_root = artifact_root
        self.artifacts_destination = artifacts_destination
        self.cwd = cwd
        self.port = port if port is not None else free_port()
        #: Base URL, no trailing slash: what a client's tracking URI is.
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def in_folder(cls, folder: Path, port: int | None = None) -> MlflowServer:
        """A server whose store, proxied artifacts and log all live in ``folder`` (``server.db``, ``artifacts/``,
        ``mlflow-server.log``), started from there."""
        return cls(
            f"sqlite:///{folder / 'server.db'}",
            folder / "mlflow-server.log",
            artifacts_destination=folder / "artifacts",
            cwd=folder,
            port=port,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        command = [
            *_mlflow_command(),
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        if self.artifact_root is not None:
            command += ["--default-artifact-root", str(self.artifact_root)]
        if self.artifacts_destination is not None:
            command += ["--artifacts-destination", str(self.artifacts_destination)]
        return command

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
        """Start the server and return once ``/health`` says OK.

        Raises ``RuntimeError`` with the server's log when it exits first or does not answer within ``timeout_s``
        (the process group is stopped before raising)."""
        if self.running:
            raise RuntimeError(f"the mlflow server at {self.url} is already running")
        self.starts += 1
        command = self.command()
        # No telemetry: test machines have no internet and must not try to reach it.
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb" if self.starts == 1 else "ab") as log:
            if self.starts > 1:
                log.write(f"\n--- start {self.starts} ---\n".encode())
                log.flush()
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not _healthy(self.url):
            problem = None
            if self.process.poll() is not None:
                problem = f"exited with {self.process.returncode} before answering {self.url}/health"
            elif time.monotonic() > deadline:
                problem = f"did not answer {self.url}/health within {timeout_s:.0f} s"
            if problem is not None:
                self.kill()
                raise RuntimeError(f"`{' '.join(command)}` {problem}:\n{self.log_tail()}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it if it has not exited after ``STOP_TIMEOUT_S``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT_S)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server's process group at once: the server dies as a crashed one would."""
        if self.process is None:
            return
        # Also when the leader has exited already: workers it forked may still hold the port.
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        # The orphaned workers are reaped by init, not by us: wait (briefly) until none of the group is left.
        deadline = time.monotonic() + 10
        while self._group_exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.process = None

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
        """Stop the server (when running) and start it again on the same port over the same store."""
        self.stop()
        return self.start(timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"

    def _signal_group(self, sig: signal.Signals) -> None:
        # Only the group this object started (start_new_session=True makes the server its leader).
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def _group_exists(self) -> bool:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: a stranger's group took the id
            return False
        return True

    def __enter__(self) -> MlflowServer:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    log_path: Path,
    artifact_root: Path | None = None,
    cwd: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Iterator[MlflowServer]:
    """``MlflowServer(...)`` started (answering ``/health``) for the block, stopped after it."""
    server = MlflowServer(backend_store_uri, log_path, artifact_root=artifact_root, cwd=cwd)
    server.start(timeout_s)
    try:
        yield server
    finally:
        server.stop()
