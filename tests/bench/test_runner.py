"""`twophase bench` on tiny artifacts: every cell measured, speedups against the fp32 artifact of the same run,
CSV / Markdown / PNG outputs, roofline bounds, cells beyond max_len skipped, argument checks."""

from __future__ import annotations

import csv

import pytest

from twophase.bench.report import CSV_FIELDS, write_report
from twophase.bench.runner import BenchConfig, run_bench
from twophase.compiler.errors import TwophaseError

CONFIG = dict(batches=(1, 2), contexts=(8, 24), reps=2, decode_steps=3, threads=1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from tiny import save_tiny_hf_dir

    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import CompileOptions, KVBinding, PhaseOptions, QuantScheme

    root = tmp_path_factory.mktemp("bench")
    save_tiny_hf_dir(root / "hf", "gqa16", max_positions=32)
    return [
        compile_model(str(root / "hf"), root / "a-fp32", CompileOptions(prefill=PhaseOptions(), decode=PhaseOptions())),
        compile_model(str(root / "hf"), root / "w4", CompileOptions(
            prefill=PhaseOptions(), decode=PhaseOptions(QuantScheme.W4A16), kv_binding=KVBinding.GROW)),
    ]


def test_bench_measures_every_cell_against_fp32(artifacts, tmp_path):
    result = run_bench(artifacts, BenchConfig(**CONFIG, roofline=True))
    assert len(result.rows) == 2 * 2 * 2 * 2  # artifacts x phases x batches x contexts
    for r in result.rows:
        assert r.tok_s > 0 and r.tok_s_min <= r.tok_s <= r.tok_s_max
        assert r.baseline == "a-fp32"
        if r.artifact == "a-fp32":
            assert r.speedup == pytest.approx(1.0)
        assert r.bound_tok_s > 0 and 0 < r.roofline_fraction
        assert (r.bytes_per_token is not None) == (r.phase == "decode")
    assert {r.kv_binding for r in result.rows} == {"bound", "grow"}
    assert result.machine["read_bandwidth_gbs"] > 0

    paths = write_report(result, tmp_path / "out")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and list(rows[0]) == CSV_FIELDS
    text = paths["markdown"].read_text()
    assert "b2 c24" in text and "Roofline" in text and "(1.00x)" in text
    assert {p.name for p in paths["plots"]} == {
        f"speedup_vs_{axis}_{phase}.png" for axis in ("batch", "context") for phase in ("prefill", "decode")
    }
    assert all(p.stat().st_size > 1000 for p in paths["plots"])


def test_cells_beyond_max_len_are_skipped(artifacts):
    result = run_bench(artifacts[:1], BenchConfig(batches=(1,), contexts=(8, 31), reps=1, decode_steps=3,
                                                  threads=1, phases=("decode",)))
    assert [(r.context) for r in result.rows] == [8]
    assert "exceeds max_len 32" in result.skipped[0]


def test_bench_argument_checks():
    with pytest.raises(TwophaseError, match="batches"):
        BenchConfig(batches=(0,))
    with pytest.raises(TwophaseError, match="phases"):
        BenchConfig(phases=("train",))
    with pytest.raises(TwophaseError, match="at least one"):
        run_bench([], BenchConfig())
