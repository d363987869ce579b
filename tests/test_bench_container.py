"""`benchmarks/bench_container.py`: a real (tiny NetVLAD) artifact re-written as format version 2 and as version 3
holds the same tensors and payload, and version 3's overhead is the smaller; a missing file is refused by name."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, load_benchmark
from tiny_artifacts import tiny_artifact


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(REPO / "benchmarks" / "bench_container.py")


def test_both_versions_hold_the_same_payload_and_version_3_is_smaller(bench, tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    tiny_artifact(path, bits=3, sparsity=0.6, image_size=None)
    assert bench.main([str(path), "--json", str(tmp_path / "out.json")]) == 0
    row = json.loads((tmp_path / "out.json").read_text())["rows"][0]
    assert row["v2"]["payload_bytes"] == row["v3"]["payload_bytes"] > 0
    assert row["v3"]["overhead_bytes"] < 0.5 * row["v2"]["overhead_bytes"], row
    assert "| **all 1** |" in capsys.readouterr().out


def test_a_missing_file_is_named(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors" in capsys.readouterr().err
