"""The TVM backend end to end: `compile --backend tvm` artifacts load through Engine.load and give the ORT
backend's logits and tokens for the same scheme (batches, chunked prefill, slots), and bad artifacts or
options fail with errors that name the problem."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from twophase.compiler.driver import compile_model
from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError, UnsupportedModelError
from twophase.compiler.inspect import inspect_artifact
from twophase.compiler.lower_tvm import usable_cores
from twophase.compiler.options import Backend, CompileOptions, KVDtype, PhaseOptions, QuantScheme
from twophase.runtime import backend_tvm
from twophase.runtime.engine import Engine

pytest.importorskip("tvm")

from twophase.kernels.tir.qgemv_a8 import PREFETCH_BYTES  # noqa: E402

W4 = PhaseOptions(QuantScheme.W4A16, accuracy_level=1)  # ORT level 1: float activations, as TVM's kernels


@pytest.fixture(scope="module")
def artifacts(tiny_hf_dir, tmp_path_factory):
    """{backend: artifact dir} for the tiny gqa16 model, w4a16 prefill and decode."""
    hf_dir, _ = tiny_hf_dir("gqa16")
    root = tmp_path_factory.mktemp("tvm-e2e")
    out = {}
    for backend in (Backend.TVM, Backend.ORT):
        out[backend.value] = compile_model(
            str(hf_dir), root / backend.value, CompileOptions(backend=backend, prefill=W4, decode=W4, max_len=96)
        )
    return out


@pytest.fixture(scope="module")
def engines(artifacts):
    return {name: Engine.load(path, threads=2) for name, path in artifacts.items()}


def test_artifact_layout(artifacts):
    root = artifacts["tvm"]
    manifest = json.loads((root / "manifest.json").read_text())
    for phase in ("prefill", "decode"):
        entry = manifest["phases"][phase]
        assert entry["backend"] == "tvm" and entry["graph"] == f"{phase}.so" and entry["params"] == f"{phase}.params.json"
        assert entry["target"]["tvm_target"]["kind"] == "llvm"
        # the probe's verdict (lower_tvm.prefetch_entry): PREFETCH_BYTES or none, and what it measured
        assert entry["target"]["prefetch_bytes"] in (0, PREFETCH_BYTES) and entry["target"]["prefetch_speedup"] > 0
        assert (root / entry["graph"]).is_file()
    assert "(the probe measured " in inspect_artifact(root)["text"]
    assert manifest["kv_cache"]["binding"] == "bound"
    assert not list(root.glob("*.onnx"))
    # both phases read the same w4a16 weights: one copy in weights.bin
    idx = [json.loads((root / f"{p}.params.json").read_text())["params"] for p in ("prefill", "decode")]
    assert {e["offset"] for e in idx[0]} == {e["offset"] for e in idx[1]}
    # what a step reads by row, not whole, is marked (benchmarks/phases.py counts a decode step's bytes without it):
    # the quantized embedding table with its scales (QGather), and the rotary cos / sin tables
    rows = {e["name"] for e in idx[1] if e.get("rows")}
    assert rows and all(".table.tvm" in n or "cos" in n or "sin" in n for n in rows), rows
    assert any(".table.tvm" in n for n in rows) and any("cos" in n for n in rows)
    assert not any(".table.tvm" in e["name"] for e in idx[1] if not e.get("rows"))
    assert inspect_artifact(root)["phases"]["decode"]["ops"]["table read by row"] == len(rows)


def test_bench_roofline_counts_a_tvm_phase(artifacts):
    """`twophase bench --roofline` on a TVM artifact: its decode bytes come from the parameter index (the tables read
    by row left out, as the ORT graph's Gathers are), and its prefill, a compiled library with no graph to count
    MACs from, gets no bound instead of an error."""
    from twophase.bench.model_bytes import phase_bytes
    from twophase.bench.runner import BenchConfig, run_bench

    tvm, ort = (Engine.load(artifacts[b], threads=1) for b in ("tvm", "ort"))
    ours, theirs = (phase_bytes(e.root, e.manifest.phases["decode"]) for e in (tvm, ort))
    assert ours.gathered > 0 and theirs.gathered > 0
    assert ours.streamed == pytest.approx(theirs.streamed, rel=0.1)  # the same w4a16 weights, packed differently
    result = run_bench([artifacts["tvm"]], BenchConfig(batches=(1,), contexts=(8,), reps=1, decode_steps=2,
                                                      threads=1, roofline=True))
    rows = {r.phase: r for r in result.rows}
    assert rows["decode"].bytes_per_token > ours.streamed and rows["decode"].bound_tok_s > 0
    assert rows["prefill"].bound_tok_s is None and rows["prefill"].roofline_fraction is None


def _chunked_logits(engine: Engine, decode_steps: int) -> np.ndarray:
    """A left-padded batch of 2 prefilled in chunks of 4, then `decode_steps` decode steps: stacked logits."""
    ids = np.array([[1, 5, 9, 33, 12, 7, 8, 40, 41], [0, 0, 0, 1, 50, 60, 7, 3, 2]])
    mask = (np.arange(9)[None] >= np.array([[0], [3]])).astype(np.int64)
    engine.prefill_chunk = 4
    out = [engine.prefill(ids, mask, reserve=8)]
    for t in range(decode_steps):
        out.append(engine.decode_one_token(np.array([3 + t, 20 + t])))
    return np.stack(out)


def test_logits_match_ort(engines):
    """_chunked_logits with 5 decode steps: TVM's logits == ORT's."""
    res = {name: _chunked_logits(e, 5) for name, e in engines.items()}
    np.testing.assert_allclose(res["tvm"], res["ort"], rtol=0, atol=2e-4 * np.abs(res["ort"]).max())


def test_greedy_tokens_match_ort(engines):
    prompts = [[1, 5, 9], [4, 4, 4, 4, 4, 20], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    tvm_rows = engines["tvm"].generate_batch_ids(prompts, max_new_tokens=12)
    ort_rows = engines["ort"].generate_batch_ids(prompts, max_new_tokens=12)
    assert [list(r) for r in tvm_rows] == [list(r) for r in ort_rows]
    alone = [list(engines["tvm"].generate_batch_ids([p], max_new_tokens=12)[0]) for p in prompts]
    assert alone == [list(r) for r in tvm_rows]


def test_slots_match_ort(engines):
    """Continuous batching: rows prefilled into slots, decoded together with an idle row."""
    res = {}
    for name, e in engines.items():
        e.start_slots(3, 32)
        first = [e.prefill_slot(0, [1, 5, 9, 11]), e.prefill_slot(2, [7, 7, 8])]
        steps = [e.decode_one_token(np.array([3, 0, 4]), active=np.array([True, False, True]))[[0, 2]]]
        res[name] = np.concatenate([np.stack(first), *steps])
    np.testing.assert_allclose(res["tvm"], res["ort"], rtol=0, atol=2e-4 * np.abs(res["ort"]).max())


def test_w8a8_prefill_matches_ort(tiny_hf_dir, tmp_path: Path):
    """w8a8 (dynamic per-token activations) prefill + w4a16 decode: the TVM artifact's logits equal the ORT
    artifact's. Same codes and scales on both sides (ORT: u8 activations with zero point 128 on the same
    grid, MatMulIntegerToFloat); they differ in float rounding of the scaling only (measured 2e-6 on logits
    of magnitude 10)."""
    hf_dir, _ = tiny_hf_dir("gqa16")
    options = {b: CompileOptions(backend=b, prefill=PhaseOptions(QuantScheme.W8A8), decode=W4, max_len=96)
               for b in (Backend.TVM, Backend.ORT)}
    engines = {b.value: Engine.load(compile_model(str(hf_dir), tmp_path / b.value, o), threads=2)
               for b, o in options.items()}
    manifest = json.loads((tmp_path / "tvm" / "manifest.json").read_text())
    assert manifest["phases"]["prefill"]["scheme"] == "w8a8"
    report = json.loads((tmp_path / "tvm" / "report.json").read_text())
    assert "FuseTVMKernelsPass" in json.dumps(report) and "QMatMulA8" in json.dumps(report)
    res = {name: _chunked_logits(e, 3) for name, e in engines.items()}
    np.testing.assert_allclose(res["tvm"], res["ort"], rtol=0, atol=1e-5 * np.abs(res["ort"]).max())


def test_int8_kv_cache_matches_ort(tiny_hf_dir, tmp_path: Path):
    """--kv-dtype int8: the same calibrated per (kv head, channel) scales on both backends; the TVM kernel stores
    the codes as ORT's does (round half to even, saturated), so logits agree to float rounding and the caches
    hold int8 codes, all but a few equal to ORT's (a code apart where x / scale rounds at a .5)."""
    hf_dir, _ = tiny_hf_dir("gqa16")
    options = {b: CompileOptions(backend=b, prefill=W4, decode=W4, max_len=96, kv_dtype=KVDtype.INT8)
               for b in (Backend.TVM, Backend.ORT)}
    engines = {b.value: Engine.load(compile_model(str(hf_dir), tmp_path / b.value, o), threads=2)
               for b, o in options.items()}
    manifest = json.loads((tmp_path / "tvm" / "manifest.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "int8"
    res, caches = {}, {}
    for name, e in engines.items():
        res[name] = _chunked_logits(e, 5)
        caches[name] = [a.copy() for a in e.cache.arrays()]
    np.testing.assert_allclose(res["tvm"], res["ort"], rtol=0, atol=2e-4 * np.abs(res["ort"]).max())
    for a, b in zip(caches["tvm"], caches["ort"]):
        assert a.dtype == b.dtype == np.int8 and np.abs(a).max() > 64
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000


def test_batched_int8_gemv_rows_as_alone(tiny_hf_dir, tmp_path: Path, monkeypatch):
    """Accuracy level 4 (int8 activations in the decode GEMV, up to 16 rows): 9 rows of different lengths
    (row groups of 4, 4 and 1 in each tile) decode together as each does alone: the same greedy tokens, and,
    with each row prefilled alone into its slot, decode logits equal to float rounding (the attention splits
    its keys differently by batch; the GEMV rows are bit for bit, tests/kernels/test_tir_qgemv_a8.py).
    Built with software prefetches (TWOPHASE_TVM_PREFETCH), whatever the probe would find on this machine."""
    monkeypatch.setenv("TWOPHASE_TVM_PREFETCH", "4096")
    hf_dir, _ = tiny_hf_dir("gqa16")
    level4 = PhaseOptions(QuantScheme.W4A16, accuracy_level=4)
    engine = Engine.load(compile_model(str(hf_dir), tmp_path / "tvm", CompileOptions(
        backend=Backend.TVM, prefill=level4, decode=level4, max_len=96)), threads=2)
    assert b"qgemv_a8" in (tmp_path / "tvm" / "decode.so").read_bytes()  # the int8-activation GEMV kernels
    target = json.loads((tmp_path / "tvm" / "manifest.json").read_text())["phases"]["decode"]["target"]
    assert (target["prefetch_bytes"], target["prefetch_speedup"]) == (4096, None)
    assert "software prefetch: 4096 B ahead (set by TWOPHASE_TVM_PREFETCH)" in inspect_artifact(tmp_path / "tvm")[
        "text"]
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(3, 97, n)) for n in (3, 9, 5, 14, 1, 7, 11, 2, 6)]
    rows = engine.generate_batch_ids(prompts, max_new_tokens=10)
    alone = [list(engine.generate_batch_ids([p], max_new_tokens=10)[0]) for p in prompts]
    assert [list(r) for r in rows] == alone

    feed = rng.integers(3, 97, (4, len(prompts)))  # the tokens decoded after the prompts, per step and row

    def slots(batch: list, columns: slice) -> np.ndarray:
        engine.start_slots(len(batch), 32)
        first = np.stack([engine.prefill_slot(i, p) for i, p in enumerate(batch)])
        return np.stack([first] + [engine.decode_one_token(f[columns]) for f in feed], axis=1)  # (B, 5, V)

    together = slots(prompts, slice(None))
    for i, p in enumerate(prompts):
        one = slots([p], slice(i, i + 1))[0]
        np.testing.assert_array_equal(together[i, 0], one[0])  # the same prefill (one row alone both times)
        np.testing.assert_allclose(together[i], one, rtol=0, atol=1e-5 * np.abs(one).max(), err_msg=f"row {i}")


def test_bad_token_ids(engines):
    e = engines["tvm"]
    with pytest.raises(TwophaseError, match=r"token ids must be in \[0, 97\)"):
        e.prefill(np.array([[1, 200]]))


def test_corrupt_params_index(artifacts, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts["tvm"], bad)
    (bad / "decode.params.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="decode.params.json"):
        Engine.load(bad, verify=False)


def test_truncated_weights(artifacts, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts["tvm"], bad)
    with open(bad / "weights.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match="outside weights.bin"):
        Engine.load(bad, verify=False)


_POOL_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import tvm
if sys.argv[1] == "started":
    tvm.runtime.num_threads()  # TVM starts its pool here, at TVM_NUM_THREADS=1
from twophase.runtime.backend_tvm import _tvm
_tvm(2)
print("pool", tvm.runtime.num_threads())
"""


@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 cores")
def test_threads_after_tvm_started_its_pool_are_named():
    """Loading with threads=2 where TVM already runs a pool of 1 thread warns that 2 does not take effect (TVM
    sizes its pool once per process); as the first use of TVM it takes effect, without a warning."""
    import subprocess
    import sys

    def run(mode: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
        if mode == "started":
            env["TVM_NUM_THREADS"] = "1"
        return subprocess.run([sys.executable, "-c", _POOL_SCRIPT, mode], env=env, capture_output=True, text=True,
                              timeout=120)

    started, fresh = run("started"), run("fresh")
    assert started.returncode == 0 and fresh.returncode == 0, started.stderr[-2000:] + fresh.stderr[-2000:]
    assert "pool 1" in started.stdout and "runs 1 threads, not the 2 asked for" in started.stderr
    assert "pool 2" in fresh.stdout and "asked for" not in fresh.stderr


def test_missing_cpu_features(artifacts, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(artifacts["tvm"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["phases"]["decode"]["target"]["cpu_flags"].append("avx1024_imaginary")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="avx1024_imaginary"):
        Engine.load(bad, verify=False)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("gqa16", CompileOptions(backend=Backend.TVM, decode=PhaseOptions(QuantScheme.W8A8)), "prefill phase only"),
        ("gqa", CompileOptions(backend=Backend.TVM), "bound KV cache"),  # head_dim 12: no GQA binding
    ],
)
def test_unsupported_options(tiny_hf_dir, tmp_path: Path, name, options, match):
    hf_dir, _ = tiny_hf_dir(name)
    with pytest.raises(UnsupportedModelError, match=match):
        compile_model(str(hf_dir), tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def _decode_run(engine, steps=6, shift=0):
    """Prefill a left-padded batch of 3, then decode: all rows, then rows 0-1 only (a step over the first 2 rows)."""
    ids = np.array([[1, 5, 9, 33, 12, 7, 8], [0, 0, 0, 1, 50, 60, 7], [0, 4, 4, 4, 4, 4, 20]])
    mask = (ids != 0).astype(np.int64)
    mask[0, 0] = 1
    out = [engine.prefill((ids + shift) * mask, mask, reserve=2 * steps)]
    for t in range(steps):
        out.append(engine.decode_one_token(np.array([3 + t, 20 + t, 9 + shift])))
    for t in range(steps):
        out.append(engine.decode_one_token(np.array([5, 6 + t, 0]), active=np.array([True, True, False]))[:2])
    return np.concatenate(out, axis=None)


def test_decode_steps_replay_the_vm_bit_for_bit(artifacts, monkeypatch):
    """Decode steps run as a native replay of their kernel calls (backend_tvm module doc): the logits equal
    those of steps that stay on the Relax VM (TWOPHASE_TVM_REPLAY=0), bit for bit, for the full batch and for
    a step over its first rows; a second request of the same shapes binds its new cache into the templates
    the first one recorded."""
    monkeypatch.setenv("TWOPHASE_TVM_REPLAY", "0")
    vm = Engine.load(artifacts["tvm"], threads=2)
    expected = [_decode_run(vm), _decode_run(vm, shift=2)]
    assert vm.decode_phase._replay_fn is None and all(s.replay is None for s in vm._decode_steps.values())
    monkeypatch.delenv("TWOPHASE_TVM_REPLAY")
    replayed = Engine.load(artifacts["tvm"], threads=2)
    first = _decode_run(replayed)
    templates = dict(replayed.decode_phase._templates)
    second = _decode_run(replayed, shift=2)
    assert replayed.decode_phase._templates == templates and len(templates) == 2  # no new recording
    steps = list(replayed._decode_steps.values())
    assert len(steps) == 2 and all(s.replay is not None and s.replay.template in templates.values() for s in steps)
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_array_equal(second, expected[1])


def test_failed_replay_falls_back_to_the_vm(artifacts, caplog, monkeypatch):
    """A replay whose kernel call fails hands the step back to the VM, which gives the same logits."""
    monkeypatch.setenv("TWOPHASE_TVM_REPLAY", "0")
    vm_logits = _decode_run(Engine.load(artifacts["tvm"], threads=2), steps=3)
    monkeypatch.delenv("TWOPHASE_TVM_REPLAY")
    e = Engine.load(artifacts["tvm"], threads=2)
    ids = np.array([[1, 5, 9, 33, 12, 7, 8], [0, 0, 0, 1, 50, 60, 7], [0, 4, 4, 4, 4, 4, 20]])
    mask = (ids != 0).astype(np.int64)
    mask[0, 0] = 1
    out = [e.prefill(ids, mask, reserve=6)]
    for t in range(3):
        if t == 2:
            step = next(iter(e._decode_steps.values()))
            assert step.replay is not None
            step.replay._fn = lambda *args: 5  # "call 4 failed"
        out.append(e.decode_one_token(np.array([3 + t, 20 + t, 9])))
    assert "call 4 of" in caplog.text and "Relax VM from now on" in caplog.text
    assert step.replay is None
    np.testing.assert_array_equal(np.concatenate(out, axis=None), vm_logits[: sum(o.size for o in out)])


def test_replayed_logits_belong_to_the_caller(artifacts):
    """A replayed step returns its logits as a copy (they are read from the output tensor's memory, which the
    next step overwrites): logits a caller keeps stay as they were."""
    e = Engine.load(artifacts["tvm"], threads=2)
    e.prefill(np.array([[1, 5, 9, 33]]), np.ones((1, 4), dtype=np.int64), reserve=4)
    e.decode_one_token(np.array([3]))  # recorded on the VM
    kept = e.decode_one_token(np.array([4]))  # replayed
    before = kept.copy()
    step = next(iter(e._decode_steps.values()))
    assert step.replay is not None and not np.shares_memory(kept, step.replay.logits)
    e.decode_one_token(np.array([5]))
    np.testing.assert_array_equal(kept, before)
    assert not np.array_equal(step.replay.logits[:, 0, :], before)  # the buffer did change under it


def _logits_after(engine, prompt, tokens):
    """The logits of the last of `tokens`, decoded one by one after `prompt`."""
    engine.prefill(prompt, np.ones_like(prompt), reserve=4)
    for t in tokens:
        out = engine.decode_one_token(np.array([t]))
    return out


def test_one_row_steps_take_integers_and_match_the_vm(artifacts, monkeypatch):
    """One-row decode steps after the first go through TvmDecodeStep.run_one, with no numpy bookkeeping: the
    VM's logits bit for bit, across a cache that grows (64 -> 96 positions) and up to max_len, where the next
    token is refused as before; a token outside the vocabulary is refused with the cache as it was."""
    monkeypatch.setenv("TWOPHASE_TVM_REPLAY", "0")
    vm = Engine.load(artifacts["tvm"], threads=2)
    monkeypatch.delenv("TWOPHASE_TVM_REPLAY")
    e = Engine.load(artifacts["tvm"], threads=2)
    general = []
    run = backend_tvm.TvmDecodeStep.run
    monkeypatch.setattr(backend_tvm.TvmDecodeStep, "run", lambda self, *a: general.append(self) or run(self, *a))
    prompt = np.array([[1, 5, 9, 33, 12]])
    logits = {}
    for name, engine in (("vm", vm), ("replay", e)):
        out = [engine.prefill(prompt, np.ones_like(prompt))]
        for t in range(96 - 5):
            out.append(engine.decode_one_token(np.array([(7 * t) % 97])))
        with pytest.raises(ContextLengthError, match="max_len is 96"):
            engine.decode_one_token(np.array([3]))
        assert engine.cache.length == 96
        logits[name] = np.concatenate(out, axis=None)
    np.testing.assert_array_equal(logits["replay"], logits["vm"])
    general_replay = [s for s in general if s.phase is e.decode_phase]
    assert len(general_replay) == 2  # the general path: the first step over each cache (64, then 96 positions)
    e.prefill(prompt, np.ones_like(prompt), reserve=4)
    e.decode_one_token(np.array([4]))
    e.decode_one_token(np.array([4]))  # now through run_one
    length = e.cache.length
    with pytest.raises(TwophaseError, match=r"token ids must be in \[0, 97\), got 97\.\.97"):
        e.decode_one_token(np.array([97]))
    assert e.cache.length == length
    np.testing.assert_array_equal(e.decode_one_token(np.array([5])), _logits_after(vm, prompt, [4, 4, 5]))


def test_replay_plan_leaves_out_only_bookkeeping_builtins():
    import tvm_ffi

    kernel = tvm_ffi.get_global_func("runtime.config_threadpool")  # any FFI function stands for a kernel
    calls = [("vm.builtin.check_tensor_info", kernel, []), ("vm.builtin.alloc_tensor", kernel, []),
             ("gemv", kernel, [7])]
    plan, why = backend_tvm.replay_plan(calls)
    assert [name for name, _, _ in plan] == ["gemv"] and why == ""
    assert backend_tvm.replay_plan(calls + [("vm.builtin.copy", kernel, [])]) == (None, "it calls vm.builtin.copy")
    assert backend_tvm.replay_plan([("gemv", kernel, ["x"])]) == (None, "gemv takes a str")
    assert backend_tvm.replay_plan(calls[:2]) == (None, "it calls no kernel")


def test_eval_against_ort_twin(artifacts):
    """`twophase eval` runs TVM artifacts (prefill teacher-forced through the prefill library, decode through
    the bound step); against the ORT artifact of the same scheme both phases agree to float rounding."""
    from twophase.compiler.evaluate import evaluate_artifact

    ids = np.random.default_rng(0).integers(3, 97, 400)
    report = evaluate_artifact(artifacts["tvm"], artifacts["ort"], windows=3, length=32, decode_windows=2,
                               decode_length=24, ids=ids)
    for phase in (report.prefill, report.decode):
        assert abs(phase.dppl_pct) < 0.01 and phase.agreement > 0.99, phase
    assert report.prefill.scheme == report.decode.scheme == "w4a16"


def test_eval_gemv_rows_match_the_kernel():
    """eval scores TVM decode in batches the int8-activation GEMV takes, and prefill in batches it does not."""
    import inspect

    from twophase.compiler.evaluate import TVM_GEMV_ROWS, TVM_PREFILL_GEMV_ROWS, _run_prefill_steps
    from twophase.kernels.tir.qgemv_a8 import MAX_M

    assert TVM_GEMV_ROWS == MAX_M
    assert TVM_PREFILL_GEMV_ROWS < inspect.signature(_run_prefill_steps).parameters["group"].default


@pytest.mark.parametrize("sizes", [[(3, 5), (7,), (2, 2)], [(1 << 19,), (1000,), (3, 4)]], ids=["small", "huge"])
def test_weight_arena(sizes):
    """The arena the weights are copied into: zeroed, writable, disjoint arrays, each 64-byte aligned (TVM
    shares them without a copy); a mapping of at least a huge page starts on a 2 MiB boundary."""
    from twophase.runtime.backend_tvm import HUGE_PAGE, zeroed_arena

    dtypes = [np.float32, np.uint8, np.int64]
    arrays = zeroed_arena(sizes, dtypes)
    assert [a.shape for a in arrays] == sizes and [a.dtype for a in arrays] == [np.dtype(d) for d in dtypes]
    assert all(a.ctypes.data % 64 == 0 and a.flags.writeable and not a.any() for a in arrays)
    for i, a in enumerate(arrays):
        a[...] = i + 1
    assert all((a == i + 1).all() for i, a in enumerate(arrays))  # no overlap
    if sum(a.nbytes for a in arrays) >= HUGE_PAGE:
        assert arrays[0].ctypes.data % HUGE_PAGE == 0
    assert zeroed_arena([], []) == []


def test_weights_are_shared_and_exact(artifacts, engines):
    """Both phases read one copy of each weight (the same TVM tensor), equal to its bytes in weights.bin."""
    engine, root = engines["tvm"], Path(artifacts["tvm"])
    pre, dec = engine.prefill_phase.params, engine.decode_phase.params
    index = json.loads((root / engine.decode_phase.entry.params).read_text())
    blob = np.fromfile(root / index["weights"], dtype=np.uint8)
    shared = {id(t) for t in pre} & {id(t) for t in dec}
    assert shared and len(dec) == len(index["params"])
    for t, p in zip(dec, index["params"]):
        want = blob[p["offset"] : p["offset"] + p["length"]].view(p["dtype"]).reshape(p["shape"])
        np.testing.assert_array_equal(t.numpy(), want)
