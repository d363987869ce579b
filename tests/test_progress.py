"""trainables/progress.py: bars on a terminal, parseable key=value lines in a log."""

from __future__ import annotations

import re

from trainables.progress import format_seconds, mode, progress


def test_log_mode_writes_parseable_lines_with_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("VLADSWEEP_PROGRESS", "log")
    monkeypatch.setenv("VLADSWEEP_PROGRESS_EVERY", "0.5")
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr("trainables.progress.time.monotonic", lambda: float(next(clock)))
    with progress("base: fine-tune", total=4, unit="step") as bar:
        for _ in range(4):
            bar.update(1)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("progress ")]
    assert lines, "no progress line in log mode"
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', lines[0]))
    assert fields["step"] == '"base: fine-tune"' and fields["total"] == "4" and fields["unit"] == "step"
    assert "rate" in fields and "eta" in fields
    last = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', lines[-1]))
    assert last["done"] == "4" and last.get("finished") == "true"


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("VLADSWEEP_PROGRESS", raising=False)
    assert mode() == "log"  # pytest captures stderr: not a terminal
    monkeypatch.setenv("VLADSWEEP_PROGRESS", "off")
    assert mode() == "off"
    assert [format_seconds(s) for s in (42, 185, 3720, None)] == ["42s", "3m05s", "1h02m", "?"]
