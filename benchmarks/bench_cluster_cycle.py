"""How long the cluster path takes: `ray up`, `ray submit` (a one-line script), `ray exec`, `ray down`.

Uses the test harness (tests/sshd_cluster.py): cluster/local.yaml against a private sshd on 127.0.0.1, so the
figures are the launcher's own overhead (ssh, rsync of the file mounts, MLflow + Ray start on the head) without
installs. Prints a markdown table of the median seconds per step.

    .venv/bin/python benchmarks/bench_cluster_cycle.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from net import free_port  # noqa: E402
from sshd_cluster import REPO, missing_tools, sshd_host  # noqa: E402


def one_cycle() -> dict[str, float]:
    times: dict[str, float] = {}
    with sshd_host() as host:
        port = free_port()
        config = host.cluster_config(
            REPO / "cluster" / "local.yaml",
            f"vsbench-{uuid.uuid4().hex[:8]}",
            VLADSWEEP_MLFLOW_PORT=str(port),
            VLADSWEEP_MLFLOW_WORKERS="1",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
            PYTHONPATH="$HOME/vladsweep",
        )
        path = str(host.write_config(config))
        script = host.root / "hello.py"
        script.write_text("print('hello from the head')\n")
        steps = [
            ("ray up (sync, setup, MLflow + Ray start)", ["up", "-y", path]),
            ("ray submit (one-line script)", ["submit", path, str(script)]),
            ("ray exec 'ray status'", ["exec", path, "ray status"]),
            ("ray down", ["down", "-y", path]),
        ]
        for name, args in steps:
            start = time.perf_counter()
            result = host.ray(*args, timeout=600)
            times[name] = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(
                    f"{name} exited {result.returncode}:\n{result.stdout[-5000:]}\n{host.diagnostics()}"
                )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="full up/submit/exec/down cycles")
    args = parser.parse_args()
    if missing_tools():
        raise SystemExit("missing: " + ", ".join(missing_tools()))
    runs = [one_cycle() for _ in range(args.repeats)]
    load = os.getloadavg()[0]
    print(f"{args.repeats} cycle(s), load average {load:.1f}\n")
    print("| step | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    totals = [sum(r.values()) for r in runs]
    print(
        f"| **whole cycle** | **{statistics.median(totals):.1f}** | {min(totals):.1f} | {max(totals):.1f} |"
    )


if __name__ == "__main__":
    main()
