"""The TVM lowering: FuseTVMKernelsPass's graph diff and grids, and phase graphs lowered to Relax and run
in TVM's VM against ONNX Runtime running the same QDQ + GroupQueryAttention graph (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from passes.test_quantize_weights import gguf_gridded, session

from twophase.compiler.graph_diff import op_histogram
from twophase.compiler.options import ActivationMode, Phase, WeightAlgorithm
from twophase.passes.bind_kv_cache import BindKVCachePass
from twophase.passes.cleanup import CleanupPass
from twophase.passes.fuse_tvm_elementwise import FuseTVMElementwisePass
from twophase.passes.fuse_tvm_kernels import TVM_DOMAIN, FuseTVMKernelsPass, _affine
from twophase.passes.pack_projections import PackProjectionsPass
from twophase.passes.quantize_activations import QuantizeActivationsPass, produces_graph_output, quantizable_matmuls
from twophase.passes.quantize_weights import QuantizeWeightsPass
from twophase.passes.split_phases import SplitPhasesPass

tvm = pytest.importorskip("tvm")

MAX_LEN = 64
SCHEMES = {
    "fp32": None,
    "int8-per-channel": {"bits": 8, "block_size": None},
    "int8-b16": {"bits": 8, "block_size": 16},
    "uint8-per-channel-asym": {"bits": 8, "block_size": None, "symmetric": False},
    "int4-b32": {"bits": 4, "block_size": 32},
    "uint4-b16-asym": {"bits": 4, "block_size": 16, "symmetric": False},
}


def bound_graph(canonical_onnx, phase: Phase, scheme: dict | None, name: str = "gqa16", gguf: bool = False) -> ir.Model:
    model = SplitPhasesPass(phase)(ir.load(canonical_onnx(name))).model
    model = CleanupPass()(model).model
    if gguf:
        model, _ = gguf_gridded(model)
        model = QuantizeWeightsPass(bits=4, block_size=32, algorithm=WeightAlgorithm.GGUF)(model).model
    elif scheme is not None:
        model = QuantizeWeightsPass(**scheme)(model).model
    return BindKVCachePass(MAX_LEN)(model).model


def w8a8_graph(canonical_onnx, mode: ActivationMode, name: str = "gqa16") -> ir.Model:
    """The prefill graph as the TVM pipeline builds it for w8a8: QDQ activations (the lm_head left float)
    before the KV binding. Static scales: a made-up per-channel absmax of 2.5 (N(0, 1)-ish activations
    saturate, which the kernel must do as QuantizeLinear does)."""
    model = SplitPhasesPass(Phase.PREFILL)(ir.load(canonical_onnx(name))).model
    model = CleanupPass()(model).model
    stats = None
    if mode is ActivationMode.STATIC:
        stats = {n.inputs[0].name: np.full(n.inputs[1].shape[0], 2.5, np.float32)
                 for n in quantizable_matmuls(model.graph, produces_graph_output)}
    model = QuantizeActivationsPass(mode, stats, None, skip=produces_graph_output)(model).model
    return BindKVCachePass(MAX_LEN)(model).model


def run_tvm(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Lower `model` (FuseTVMKernelsPass applied) with lower_tvm and run it once; the caches are copies."""
    from tvm import relax

    from twophase.compiler.lower_tvm import graph_for_import, host_target, import_relax, relax_pipeline

    proto, params = graph_for_import(model)
    target = host_target()["tvm_target"]
    ex = tvm.compile(import_relax(proto), target=tvm.target.Target(target), relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(np.array(feeds[v.name])) for v in model.graph.inputs]
    args += [tvm.runtime.tensor(a) for _, a in params]
    out = vm["main"](*args)
    return [out[i].numpy() for i in range(len(model.graph.outputs))]


def bound_feeds(model: ir.Model, lengths: list[int], query: list[int], capacity: int = MAX_LEN) -> dict:
    """Random caches holding lengths[b] - query[b] past positions; query[b] new tokens per row (right-padded)."""
    rng = np.random.default_rng(0)
    B, S = len(lengths), max(max(query), 1)
    ids = np.zeros((B, S), np.int64)
    for b, q in enumerate(query):
        ids[b, :q] = rng.integers(3, 97, q)
    feeds = {
        "input_ids": ids,
        "seqlens_k": np.maximum(np.array(lengths), 1).astype(np.int32) - 1,
        "total_sequence_length": np.array(max(max(lengths), 1), np.int32),
        "query_seqlens": np.array(query, np.int32),
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            cache = np.zeros((B, v.shape[1], capacity, v.shape[3]), np.float32)
            for b, (n, q) in enumerate(zip(lengths, query)):
                cache[b, :, : n - q] = rng.standard_normal((v.shape[1], n - q, v.shape[3]))
            feeds[v.name] = cache
    return feeds


def tvm_fusions(model: ir.Model) -> ir.Model:
    """The TVM pipeline's fusion steps: packed projections, then norms / SwiGLU / residual adds into QMatMul."""
    model = PackProjectionsPass()(model).model
    return FuseTVMElementwisePass()(model).model


def assert_matches_ort(qdq: ir.Model, feeds: dict, tmp_path: Path, query: list[int], tol: float = 2e-4,
                       fusions: bool = False) -> None:
    ref = session(qdq, tmp_path / "qdq.onnx").run(None, {k: v.copy() for k, v in feeds.items()})
    fused = FuseTVMKernelsPass()(qdq.clone()).model
    if fusions:
        fused = tvm_fusions(fused)
    out = run_tvm(fused, feeds)
    names = [v.name for v in qdq.graph.outputs]
    live = np.array(query) > 0  # an idle row's logits are meaningless
    for name, a, b in zip(names, out, ref):
        if name == "logits":
            a, b = a[live], b[live]
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, np.abs(b).max()), err_msg=name)


# -- the pass -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["fp32", "int8-per-channel", "int4-b32"])
def test_graph_diff(canonical_onnx, scheme: str):
    """Every weight MatMul becomes QMatMul and the quantized embedding QGather; no DequantizeLinear is left."""
    model = bound_graph(canonical_onnx, Phase.DECODE, SCHEMES[scheme])
    n_matmul = op_histogram(model)["MatMul"]
    p = FuseTVMKernelsPass()
    p(model)
    hist = op_histogram(model)
    want = {"QMatMul": n_matmul} | ({"QGather": 1} if SCHEMES[scheme] else {})
    assert dict(p.applied) == want
    assert hist[f"{TVM_DOMAIN}::QMatMul"] == n_matmul and "MatMul" not in hist and "DequantizeLinear" not in hist
    assert TVM_DOMAIN in model.opset_imports
    if SCHEMES[scheme] is None:  # a float table stays a plain Gather (TVM's own)
        assert hist["Gather"] == 1 and any("not produced by DequantizeLinear" in w for w in p.skipped.values())


@pytest.mark.parametrize("mode", [ActivationMode.DYNAMIC, ActivationMode.STATIC], ids=lambda m: m.value)
def test_graph_diff_w8a8(canonical_onnx, mode: ActivationMode):
    """Every W8A8 MatMul becomes one QMatMulA8 (the lm_head a float QMatMul); the activation quantization,
    its Reshape and the shape arithmetic around it disappear."""
    model = w8a8_graph(canonical_onnx, mode)
    before = op_histogram(model)
    n_a8 = before["MatMul"] - 1  # all but the lm_head
    p = FuseTVMKernelsPass()
    p(model)
    hist = op_histogram(model)
    assert dict(p.applied) == {"QMatMulA8": n_a8, "QMatMul": 1}, p.skipped
    assert hist[f"{TVM_DOMAIN}::QMatMulA8"] == n_a8 and hist[f"{TVM_DOMAIN}::QMatMul"] == 1
    gone = ("MatMul", "QuantizeLinear", "DequantizeLinear", "Reshape", "Shape", "Concat", "Abs", "ReduceMax", "Max")
    assert not [op for op in gone if op in hist], hist  # the bound float graph has none of them either
    a8 = [n for n in model.graph if n.op_type == "QMatMulA8"]
    assert {n.attributes["act"].as_string() for n in a8} == {mode.value}
    assert all(len(n.inputs) == (4 if mode is ActivationMode.STATIC else 3) for n in a8)


def test_float_offset_table_left_as_qdq(canonical_onnx):
    model = bound_graph(canonical_onnx, Phase.DECODE, None, gguf=True)
    p = FuseTVMKernelsPass()
    p(model)
    assert "QGather" in p.applied  # the Q8_0 table
    assert all("table" not in why for why in p.skipped.values())


@pytest.mark.parametrize("case", ["int4", "uint4-zp", "int8", "uint8", "uint8-zp", "uint4-offset"])
def test_affine_grid_is_exact(case: str):
    """codes * scale + offset equals DequantizeLinear's (codes - zero_point) * scale (+ the float offset)."""
    rng = np.random.default_rng(1)
    K, N, bs = 64, 8, 16
    G = K // bs
    bits = 8 if "int8" in case else 4
    signed = not case.startswith("u")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    codes = rng.integers(lo, hi + 1, (K, N)).astype(np.int8 if signed else np.uint8)
    scale = rng.uniform(0.01, 0.1, (G, N)).astype(np.float32)
    zp = rng.integers(lo, hi + 1, (G, N)).astype(codes.dtype) if "zp" in case else None
    m = rng.standard_normal((G, N)).astype(np.float32) if "offset" in case else None

    class DQ:
        pass

    dq = DQ()
    dq.codes, dq.bits, dq.signed, dq.scale, dq.zero_point, dq.block_size = codes, bits, signed, scale, zp, bs
    c, s, o, zero = _affine(dq, m)
    assert c.dtype == (np.uint8 if bits == 4 else np.int8)
    if bits == 4:
        assert c.min() >= 0 and c.max() <= 15
    assert (o is None) == (zp is None and m is None)  # symmetric grids need no offset array
    rep = lambda a: np.repeat(a, bs, axis=0)
    want = (codes.astype(np.float64) - (0 if zp is None else rep(zp))) * rep(scale) + (0 if m is None else rep(m))
    got = (c.astype(np.float64) - zero) * rep(s) + (0 if o is None else rep(o))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# -- lowered numerics against ONNX Runtime ---------------------------------------------------------


def fusion_cases(schemes: list[str], unfused: list[str]) -> pytest.MarkDecorator:
    """Every scheme with the TVM fusions (the pipeline's default), `unfused` ones also without (--no-fusions)."""
    cases = [(s, True) for s in schemes] + [(s, False) for s in unfused]
    return pytest.mark.parametrize(("scheme", "fusions"), cases, ids=[f"{s}-{'fused' if f else 'unfused'}" for s, f in cases])


@fusion_cases(sorted(SCHEMES), unfused=["fp32", "int4-b32"])
def test_decode_matches_ort(canonical_onnx, tmp_path: Path, scheme: str, fusions: bool):
    """A decode step over 3 rows (cache lengths 5, 1, 9; the middle row idle) equals ORT's: logits and caches;
    with the TVM fusions (packed QKV into attention, norms / SwiGLU / residual adds inside the kernels) and
    without."""
    model = bound_graph(canonical_onnx, Phase.DECODE, SCHEMES[scheme])
    query = [1, 0, 1]
    assert_matches_ort(model, bound_feeds(model, [5, 1, 9], query), tmp_path, query, fusions=fusions)


@fusion_cases(["fp32", "int4-b32"], unfused=["int4-b32"])
def test_prefill_matches_ort(canonical_onnx, tmp_path: Path, scheme: str, fusions: bool):
    """A chunked prefill step: row 0 starts empty with 6 tokens, row 1 has 4 cached and adds 3 (padded)."""
    model = bound_graph(canonical_onnx, Phase.PREFILL, SCHEMES[scheme])
    query = [6, 3]
    assert_matches_ort(model, bound_feeds(model, [6, 7], query), tmp_path, query, fusions=fusions)


@pytest.mark.parametrize("mode", [ActivationMode.DYNAMIC, ActivationMode.STATIC], ids=lambda m: m.value)
def test_w8a8_prefill_matches_ort(canonical_onnx, tmp_path: Path, mode: ActivationMode):
    """W8A8 prefill through the integer kernel equals ORT running the QDQ graph (same codes, same scales;
    only the float rounding of the products' sum differs: exact integers here, a float GEMM there; measured
    1e-6 on logits of magnitude 10)."""
    model = w8a8_graph(canonical_onnx, mode)
    query = [6, 3]
    assert_matches_ort(model, bound_feeds(model, [6, 7], query), tmp_path, query, tol=1e-5)


def test_gguf_grid_matches_ort(canonical_onnx, tmp_path: Path):
    """GGUF Q4_0 / Q4_1 (float offsets) / Q8_0 grids through the fused kernels equal ORT on the QDQ graph."""
    model = bound_graph(canonical_onnx, Phase.DECODE, None, gguf=True)
    query = [1, 1]
    assert_matches_ort(model, bound_feeds(model, [3, 8], query), tmp_path, query, fusions=True)


def test_mha_decode_matches_ort(canonical_onnx, tmp_path: Path):
    model = bound_graph(canonical_onnx, Phase.DECODE, SCHEMES["int4-b32"], name="mha16")
    query = [1]
    assert_matches_ort(model, bound_feeds(model, [4], query), tmp_path, query)



@pytest.mark.parametrize("scheme", ["int4-b32", "int8-b16", "int8-per-channel"])
def test_level4_decode_matches_ort_matmulnbits(canonical_onnx, tmp_path: Path, scheme: str):
    """accuracy_level 4 (int8 activations per block, qgemv_a8): a decode step over 3 rows matches ORT running
    the same QDQ graph rewritten to MatMulNBits at accuracy_level 4, and the float QDQ graph more loosely.
    Blocked weights: the same activation blocks as ORT (bs), so only float rounding differs (measured ~1e-5
    of the logits' range); per channel, ORT's blocks of 128 vs our 32 (measured ~1e-3). With the TVM fusions, as
    the pipeline builds it: the norm inside the kernel rounds differently from ORT's in the last bit, which can
    flip an activation code (one step of its block's scale; measured on 5 of 6144 cache elements, 1.2e-3)."""
    from twophase.passes.fuse_dequant_matmul import FuseDequantMatMulPass

    model = bound_graph(canonical_onnx, Phase.DECODE, SCHEMES[scheme])
    query = [1, 0, 1]
    feeds = bound_feeds(model, [5, 1, 9], query)
    fused = tvm_fusions(FuseTVMKernelsPass(accuracy_level=4)(model.clone()).model)
    qm = [n for n in fused.graph if n.op_type == "QMatMul"]
    assert qm and all(n.attributes.get_int("act_int8", 0) == 1 for n in qm)
    assert any(n.attributes.get_string("prologue", "none") == "rms_norm" for n in qm)
    nbits = FuseDequantMatMulPass(4)(model.clone()).model
    assert any(n.op_type == "MatMulNBits" for n in nbits.graph)
    ort4 = session(nbits, tmp_path / "nbits.onnx").run(None, {k: v.copy() for k, v in feeds.items()})
    qdq = session(model, tmp_path / "qdq.onnx").run(None, {k: v.copy() for k, v in feeds.items()})
    out = run_tvm(fused, feeds)
    live = np.array(query) > 0
    names = [v.name for v in model.graph.outputs]
    tol_ort, tol_qdq = (2e-3, 2e-2) if scheme == "int8-per-channel" else (2e-4, 2e-2)
    for name, a, b4, bf in zip(names, out, ort4, qdq):
        if name == "logits":
            a, b4, bf = a[live], b4[live], bf[live]
        scale = max(1.0, np.abs(bf).max())
        # all but the odd flipped code within tol_ort (a different blocking would move most elements)
        near = np.abs(a - b4) <= tol_ort * scale
        assert near.mean() >= 0.99, f"{name}: {near.mean():.4f} of elements within {tol_ort} of ORT level 4"
        np.testing.assert_allclose(a, b4, rtol=0, atol=10 * tol_ort * scale, err_msg=f"{name} vs ORT level 4")
        np.testing.assert_allclose(a, bf, rtol=0, atol=tol_qdq * scale, err_msg=f"{name} vs QDQ float")


@pytest.mark.parametrize(("attr", "value"), [("k_quant_type", "PER_TENSOR"), ("kv_cache_bit_width", 4)])
def test_int8_cache_forms_it_cannot_run_are_refused(canonical_onnx, attr: str, value):
    """The attention kernel runs BindKVCachePass's int8 cache (8-bit, per-channel K and V scales); another
    quantized form (an imported graph's) is refused by name, not run with the wrong arithmetic."""
    from twophase.compiler.errors import UnsupportedModelError
    from twophase.compiler.lower_tvm import graph_for_import, import_relax
    from twophase.passes.bind_kv_cache import match_layers

    model = SplitPhasesPass(Phase.DECODE)(ir.load(canonical_onnx("gqa16"))).model
    model = CleanupPass()(model).model
    scales = {layer.index: (np.full((layer.kv_num_heads, layer.head_dim), 0.05, np.float32),) * 2
              for layer in match_layers(model.graph)}
    model = BindKVCachePass(MAX_LEN, kv_dtype="int8", kv_scales=scales)(model).model
    model = FuseTVMKernelsPass()(model).model
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.attributes[attr] = ir.AttrString(attr, value) if isinstance(value, str) else ir.AttrInt64(attr, value)
    proto, _ = graph_for_import(model)
    with pytest.raises(UnsupportedModelError, match=r"int8 one with per-channel scales.*not k/v quant types"):
        import_relax(proto)


def test_prefetch_entry(monkeypatch):
    """TWOPHASE_TVM_PREFETCH: "auto" (default) takes the probe's verdict, a distance is taken as given (nothing
    measured), anything else is refused by name."""
    from twophase.compiler import lower_tvm
    from twophase.compiler.errors import TwophaseError
    from twophase.kernels.tir.qgemv_a8 import PrefetchProbe

    calls = []
    monkeypatch.setattr(lower_tvm, "_probe_prefetch", lambda t: calls.append(t) or PrefetchProbe(4096, 1.41, 15))
    target = {"kind": "llvm", "mcpu": "znver4"}
    monkeypatch.delenv(lower_tvm.PREFETCH_ENV, raising=False)
    assert lower_tvm.prefetch_entry(target) == {"prefetch_bytes": 4096, "prefetch_speedup": 1.41}
    monkeypatch.setenv(lower_tvm.PREFETCH_ENV, "auto")
    lower_tvm.prefetch_entry(target)
    assert len(calls) == 2
    for value, want in (("0", 0), (" 2048 ", 2048)):
        monkeypatch.setenv(lower_tvm.PREFETCH_ENV, value)
        assert lower_tvm.prefetch_entry(target) == {"prefetch_bytes": want, "prefetch_speedup": None}
    assert len(calls) == 2
    for bad in ("-64", "4k", ""):
        monkeypatch.setenv(lower_tvm.PREFETCH_ENV, bad)
        with pytest.raises(TwophaseError, match="TWOPHASE_TVM_PREFETCH must be 'auto' or a distance in bytes"):
            lower_tvm.prefetch_entry(target)
