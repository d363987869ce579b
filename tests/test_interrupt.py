"""Ctrl-C stops a sweep within seconds, keeps what was finished, and ``--resume`` continues it.

The sweep runs as a terminal runs it: in its own process group, with SIGINT sent to the whole group (what Ctrl-C
does), a real local Ray in a private ``RAY_TMPDIR`` (docs/traps.md#private-ray-tmpdir), and a fresh storage so the
base model is really built (in a Ray task: sweep/base_cache.py). One sweep is interrupted twice — during the base
build and during the trials — and then resumed to the end.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from sweep_harness import private_ray_tmpdir, processes_with_env, sweep_args, wait_for

pytestmark = pytest.mark.slow

#: "Within a few seconds" from Ctrl-C to the prompt, with margin for a loaded 2-core machine (Ray's shutdown).
STOP_WITHIN_S = 20
EXIT_INTERRUPTED = 130


class Terminal:
    """``python sweep/run.py ARGS`` as a shell runs it in the foreground: its own process group, Ctrl-C to it."""

    def __init__(self, argv: list[str], cwd: Path, ray_tmpdir: Path, log: str):
        self.log = cwd / f"{log}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmpdir)}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ctrl_c(self) -> float:
        os.killpg(self.proc.pid, signal.SIGINT)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with_output = self.output[-6000:]
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"the sweep did not exit within {timeout:.0f} s:\n{with_output}") from None


def _continue_command(output: str) -> list[str]:
    """The command of the one line the sweep prints when interrupted."""
    lines = [line for line in output.splitlines() if line.startswith("interrupted while ")]
    assert len(lines) == 1, f"expected one 'interrupted while …' line:\n{output[-6000:]}"
    assert "kept " in lines[0] and "Continue with: " in lines[0], lines[0]
    return shlex.split(lines[0].split("Continue with: ", 1)[1])


def _stopped_within(term: Terminal, sent_at: float, what: str) -> None:
    rc = term.wait(timeout=STOP_WITHIN_S + 60)
    took = time.monotonic() - sent_at
    assert rc == EXIT_INTERRUPTED, f"exit status {rc} after Ctrl-C {what}:\n{term.output[-6000:]}"
    assert took < STOP_WITHIN_S, f"Ctrl-C {what}: the sweep took {took:.1f} s to exit"


def _no_ray_left(ray_tmpdir: Path) -> None:
    wait_for(
        lambda: not processes_with_env(f"RAY_TMPDIR={ray_tmpdir}"),
        f"no process of the sweep's Ray left ({processes_with_env(f'RAY_TMPDIR={ray_tmpdir}')})",
        timeout=15,
    )


def _no_unfinished_base(storage: Path) -> None:
    """Every base folder in the storage is complete (its meta.json is written last)."""
    for meta_dir in {p.parent for p in storage.rglob("model.safetensors")}:
        assert (meta_dir / "meta.json").is_file(), f"a half-written base model: {meta_dir}"
    for leftover in storage.rglob(".meta.json.*"):
        raise AssertionError(f"a half-written meta.json: {leftover}")


def test_ctrl_c_during_base_build_and_trials_then_resume_finishes(tmp_path, tiny_space):
    storage, name = tmp_path / "storage", "ctrl-c"
    args = sweep_args(
        tiny_space, storage, name, f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="vladsweep-interrupt"
    )
    command = [sys.executable, str(REPO / "sweep" / "run.py"), *args]
    with private_ray_tmpdir() as ray_tmpdir:
        # 1. Ctrl-C while the base model is being built (its progress lines come from the Ray task).
        term = Terminal(command, tmp_path, ray_tmpdir, "1-base")
        wait_for(
            lambda: 'progress step="base:' in term.output,
            "the base build's first progress line",
            timeout=600,
            alive=term.proc,
        )
        _stopped_within(term, term.ctrl_c(), "during the base build")
        out = term.output
        assert "interrupted while building the base model" in out, out[-4000:]
        resume = _continue_command(out)
        assert resume[-1] == "--resume" and resume[:2] == command[:2], resume
        _no_ray_left(ray_tmpdir)
        _no_unfinished_base(storage)
        assert not list(storage.glob("_base/*/meta.json")), "the stopped build left a finished-looking base"

        # 2. --resume builds the base and starts the trials; Ctrl-C once a trial has reported a stage.
        term = Terminal(resume, tmp_path, ray_tmpdir, "2-trials")
        wait_for(
            lambda: any(p.stat().st_size for p in (storage / name).glob("*/result.json")),
            "a trial's first report",
            timeout=900,
            alive=term.proc,
        )
        _stopped_within(term, term.ctrl_c(), "during the trials")
        out = term.output
        assert "interrupted while running the trials" in out, out[-4000:]
        assert "building the base model" in out and "not rebuilt" not in out, out[-4000:]  # built anew
        assert _continue_command(out) == resume
        _no_ray_left(ray_tmpdir)
        _no_unfinished_base(storage)

        # 3. --resume again runs what is left to the end: every trial of the space, the base not rebuilt.
        term = Terminal(resume, tmp_path, ray_tmpdir, "3-resume")
        assert term.wait(timeout=900) == 0, term.output[-6000:]
        out = term.output
        assert "4 trials: " in out and "did not finish" not in out, out[-4000:]
        assert "found in the sweep's storage; not rebuilt" in out, out[-4000:]
        _no_ray_left(ray_tmpdir)
