"""The prepared benchmark scripts: `benchmarks/gpu_check.sh` (for a borrowed GPU machine) parses, its inline Python
compiles and every flag it passes exists; `benchmarks/bench_real_size.py` answers ``--help`` and its graph model
(FLOPs and saved activations from meta tensors, the basis of its GPU cost model) counts what the layers compute;
`benchmarks/bench_layout.py` times both memory layouts of a real (tiny) model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_benchmark

GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
BENCH = REPO / "benchmarks" / "bench_real_size.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(BENCH)


def _help(*cmd: str) -> str:
    done = subprocess.run(
        [sys.executable, *cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gpu_check_is_valid_bash_and_its_python_compiles():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    text = GPU_CHECK.read_text()
    blocks = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S) + re.findall(r" -c '([^']*)'", text)
    assert len(blocks) >= 2, "expected the placement check (heredoc) and the torch probe (-c)"
    for block in blocks:
        compile(block, str(GPU_CHECK), "exec")


def test_every_flag_gpu_check_passes_exists():
    """A renamed flag of the sweep CLI or of the benchmark would fail the borrowed machine's run: caught here."""
    known = _help("sweep/run.py") + _help(str(BENCH)) + "--kill-after"  # timeout's own flag
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", GPU_CHECK.read_text()))
    assert {"--gpus-per-trial", "--num-samples", "--gpu-throughput"} <= used
    assert sorted(flag for flag in used if flag not in known) == []


def test_bench_real_size_help_names_its_modes():
    out = _help(str(BENCH))
    for flag in ("--workdir", "--models", "--image-size", "--cost-model", "--gpu-throughput"):
        assert flag in out


def test_graph_profile_counts_alexnet_convs_exactly(bench):
    """AlexNet cut at conv5, 224x224: the MACs of each conv from its output size and kernel, worked out by hand."""
    prof = bench.graph_profile("alexnet", 224, 224)
    macs = [
        55 * 55 * 64 * 3 * 11 * 11,
        27 * 27 * 192 * 64 * 5 * 5,
        13 * 13 * 384 * 192 * 3 * 3,
        13 * 13 * 256 * 384 * 3 * 3,
        13 * 13 * 256 * 256 * 3 * 3,
    ]
    assert prof["flops"]["conv"] == 2 * sum(macs)
    assert prof["feature_map"] == [13, 13]
    assert prof["flops"]["whitening"] == 2 * 64 * 256 * 4096
    assert prof["weights_by_group"]["whitening"] == 64 * 256 * 4096
    assert prof["largest_activation"] == 64 * 55 * 55


def test_saved_activations_follow_what_trains(bench):
    """Frozen layers before the first trainable one keep nothing for the backward; fp16 keeps less than fp32."""
    saved = {
        mode: bench.saved_activation_bytes("alexnet", 224, 224, mode, torch.float32)
        for mode in ("all", "base", "head")
    }
    assert saved["all"] > saved["base"] > saved["head"] > 0
    # Every layer training keeps at least each conv's input; the first conv's input is the image itself.
    assert saved["all"] >= 4 * (3 * 224 * 224 + 64 * 27 * 27 + 192 * 13 * 13 + 384 * 13 * 13 + 256 * 13 * 13)
    assert bench.saved_activation_bytes("alexnet", 224, 224, "all", torch.float16) < saved["all"]


def test_bench_layout_times_both_layouts_and_finds_the_same_descriptors(tmp_path, capsys):
    layout = load_benchmark(REPO / "benchmarks" / "bench_layout.py")
    out = tmp_path / "layout.json"
    assert layout.main(["--backbones", "tiny", "--reps", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["tiny"]
    assert min(row["plain_step"], row["cl_step"], row["plain_fwd"], row["cl_fwd"]) > 0
    assert row["max_abs_diff"] < 1e-3, row
    assert "| tiny | 28 x 128² |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        layout.main(["--reps", "0"])
