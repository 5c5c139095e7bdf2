"""The TIR GroupQueryAttention (twophase/kernels/tir/attention.py) against ORT's CPU kernel: one
com.microsoft.GroupQueryAttention node run with its cache bound in place (I/O binding, as the runtime
does), compared on the valid output rows and on the whole cache buffers after the step."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from twophase.kernels.tir.attention import gqa_prim_func

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
ORDER = ("x_q", "x_k", "x_v", "past_k", "past_v", "seqlens_k", "cos", "sin", "query_seqlens")


def _ort_session(Hq: int, Hkv: int, D: int, scale: float | None, softcap: float, interleaved: bool,
                 packed: bool = False, int8: bool = False):
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    kv = TensorProto.INT8 if int8 else f32
    vi = helper.make_tensor_value_info
    qkv = ([vi("x_qkv", f32, ["B", "S", (Hq + 2 * Hkv) * D])] if packed else
           [vi("x_q", f32, ["B", "S", Hq * D]), vi("x_k", f32, ["B", "S", Hkv * D]), vi("x_v", f32, ["B", "S", Hkv * D])])
    inputs = qkv + [
              vi("past_k", kv, ["B", Hkv, "C", D]), vi("past_v", kv, ["B", Hkv, "C", D]), vi("seqlens_k", i32, ["B"]),
              vi("total", i32, []), vi("cos", f32, ["L", D // 2]), vi("sin", f32, ["L", D // 2]),
              vi("query_seqlens", i32, ["B"])]
    names = [v.name for v in inputs[:-1]] + [""] * 7 + ["query_seqlens"]
    if packed:
        names = names[:1] + ["", ""] + names[1:]
    if int8:  # per (kv head, channel) scales are inputs 12 and 13
        inputs += [vi("k_scale", f32, [1, Hkv, 1, D]), vi("v_scale", f32, [1, Hkv, 1, D])]
        names[12:14] = ["k_scale", "v_scale"]
    attrs = {"num_heads": Hq, "kv_num_heads": Hkv, "do_rotary": 1, "rotary_interleaved": int(interleaved)}
    if scale is not None:
        attrs["scale"] = scale
    if softcap:
        attrs["softcap"] = softcap
    if int8:
        attrs.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    node = helper.make_node("GroupQueryAttention", names, ["y", "present_k", "present_v"], domain="com.microsoft", **attrs)
    outputs = [vi("y", f32, ["B", "S", Hq * D]), vi("present_k", kv, ["B", Hkv, "C", D]),
               vi("present_v", kv, ["B", Hkv, "C", D])]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inputs(Hq, Hkv, D, S, capacity, seqlens_k, query_seqlens, seed=0, int8=False):
    rng = np.random.default_rng(seed)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    B = len(seqlens_k)
    L = capacity + 3
    angles = rng.uniform(0, 2 * np.pi, (L, D // 2))
    if int8:  # scales that saturate some new entries (|x| / scale > 127 for |x| > 2.5 at scale 0.02)
        codes = lambda *shape: rng.integers(-128, 128, shape, dtype=np.int8)
        return {
            "x_q": rand(B, S, Hq * D), "x_k": rand(B, S, Hkv * D), "x_v": rand(B, S, Hkv * D),
            "past_k": codes(B, Hkv, capacity, D), "past_v": codes(B, Hkv, capacity, D),
            "seqlens_k": np.asarray(seqlens_k, np.int32), "total": np.array(max(seqlens_k) + 1, np.int32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
            "k_scale": rng.uniform(0.02, 0.05, (1, Hkv, 1, D)).astype(np.float32),
            "v_scale": rng.uniform(0.02, 0.05, (1, Hkv, 1, D)).astype(np.float32),
            "query_seqlens": np.asarray(query_seqlens, np.int32),
        }
    return {
        "x_q": rand(B, S, Hq * D), "x_k": rand(B, S, Hkv * D), "x_v": rand(B, S, Hkv * D),
        "past_k": rand(B, Hkv, capacity, D), "past_v": rand(B, Hkv, capacity, D),
        "seqlens_k": np.asarray(seqlens_k, np.int32), "total": np.array(max(seqlens_k) + 1, np.int32),
        "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
        "query_seqlens": np.asarray(query_seqlens, np.int32),
    }


def _packed(feeds: dict) -> dict:
    """The feeds with x_q, x_k, x_v packed into x_qkv (GroupQueryAttention's packed QKV input)."""
    out = {k: v for k, v in feeds.items() if k not in ("x_q", "x_k", "x_v")}
    out["x_qkv"] = np.concatenate([feeds["x_q"], feeds["x_k"], feeds["x_v"]], axis=-1)
    return out


def _run_ort(session, feeds):
    io = session.io_binding()
    arrays = {k: a.copy() for k, a in feeds.items()}  # an OrtValue does not keep its array alive
    values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
    for k, v in values.items():
        io.bind_ortvalue_input(k, v)
    io.bind_output("y")
    io.bind_ortvalue_output("present_k", values["past_k"])  # past and present are one buffer
    io.bind_ortvalue_output("present_v", values["past_v"])
    session.run_with_iobinding(io)
    return io.get_outputs()[0].numpy(), arrays["past_k"], arrays["past_v"]


def _run_tvm(Hq, Hkv, D, scale, softcap, interleaved, feeds, packed=False, split_tasks=16, prefetch_bytes=0):
    int8 = "k_scale" in feeds
    func = gqa_prim_func(Hq, Hkv, D, scale=scale, softcap=softcap, interleaved=interleaved, packed=packed,
                         split_tasks=split_tasks, kv_dtype="int8" if int8 else "float32", prefetch_bytes=prefetch_bytes)
    kernel = tvm.compile(func, target=TARGET)["main"]
    B, S, _ = feeds["x_q"].shape
    order = ("x_qkv",) + ORDER[3:] if packed else ORDER
    if int8:  # the scales follow sin
        order = order[:-1] + ("k_scale", "v_scale", order[-1])
    inputs = _packed(feeds) if packed else feeds
    args = [tvm.runtime.tensor(inputs[k]) for k in order] + [tvm.runtime.tensor(np.full((B, S, Hq * D), np.nan, np.float32))]
    kernel(*args)
    caches = 1 if packed else 3
    return args[-1].numpy(), args[caches].numpy(), args[caches + 1].numpy()


def _check(Hq, Hkv, D, S, capacity, seqlens_k, query_seqlens, *, scale=None, softcap=0.0, interleaved=False,
           packed=False, split_tasks=16, int8=False):
    feeds = _inputs(Hq, Hkv, D, S, capacity, seqlens_k, query_seqlens, int8=int8)
    session = _ort_session(Hq, Hkv, D, scale, softcap, interleaved, packed, int8)
    y_ref, k_ref, v_ref = _run_ort(session, _packed(feeds) if packed else feeds)
    y, k, v = _run_tvm(Hq, Hkv, D, scale, softcap, interleaved, feeds, packed, split_tasks)
    for b, n in enumerate(query_seqlens):
        np.testing.assert_allclose(y[b, :n], y_ref[b, :n], rtol=1e-5, atol=1e-5, err_msg=f"output row {b}")
        np.testing.assert_array_equal(y[b, n:], 0, err_msg=f"padding rows of row {b} (idle: all) are zeros")
    if int8:  # the codes of the rotated k: one code apart where x / scale lands within rounding of a .5
        diff = np.abs(k.astype(np.int32) - k_ref.astype(np.int32))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 2, "key cache codes"
    else:
        np.testing.assert_allclose(k, k_ref, rtol=1e-5, atol=1e-5, err_msg="key cache")
    np.testing.assert_array_equal(v, v_ref, err_msg="value cache")
    return feeds, k, v


@pytest.mark.parametrize(("interleaved", "packed"), [(False, False), (True, False), (False, True)])
def test_decode_rows_of_different_lengths_with_an_idle_row(interleaved, packed):
    feeds, k, v = _check(4, 2, 16, 1, 48, seqlens_k=[9, 20, 40], query_seqlens=[1, 0, 1], interleaved=interleaved,
                         packed=packed)
    np.testing.assert_array_equal(k[1], feeds["past_k"][1])  # the idle row's cache bytes are untouched
    np.testing.assert_array_equal(v[1], feeds["past_v"][1])
    for b, pos in ((0, 9), (2, 40)):  # the other rows change exactly at their new position
        changed = np.flatnonzero((k[b] != feeds["past_k"][b]).any(axis=(0, 2)))
        assert changed.tolist() == [pos]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("Hq", "Hkv", "D"), [(4, 2, 16), (4, 4, 64), (9, 3, 64)])
def test_prefill_right_padded_with_a_chunked_row(Hq, Hkv, D, interleaved):
    # row 0: a first chunk of 5 tokens (2 padding); row 1: 7 tokens after a 30-token past (chunked prefill)
    _check(Hq, Hkv, D, 7, 64, seqlens_k=[4, 36], query_seqlens=[5, 7], interleaved=interleaved)


@pytest.mark.parametrize("packed", [False, True])
def test_long_prefill_many_query_and_key_blocks(packed):
    _check(4, 2, 16, 45, 128, seqlens_k=[44, 99, 20], query_seqlens=[45, 40, 0], packed=packed)


@pytest.mark.parametrize(("B", "split_tasks"), [(1, 16), (1, 4), (2, 4), (1, 1), (16, 16)])
def test_decode_long_context_split_and_unsplit(B, split_tasks):
    # fewer tasks (B x 2 kv heads) than split_tasks: each task's keys are split (B=1: 8 or 2 ways, B=2: no split
    # at 4), else not (split_tasks 1, B=16)
    lengths = [300 + 37 * b for b in range(B)]
    _check(6, 2, 64, 1, 1024, seqlens_k=[n - 1 for n in lengths], query_seqlens=[1] * B, split_tasks=split_tasks)


@pytest.mark.parametrize(("scale", "softcap"), [(0.3, 0.0), (None, 2.5), (0.2, 4.0)])
def test_custom_scale_and_softcap(scale, softcap):
    _check(4, 2, 16, 3, 32, seqlens_k=[2, 12], query_seqlens=[3, 2], scale=scale, softcap=softcap, interleaved=True)


def test_signature_and_attributes():
    func = gqa_prim_func(9, 3, 64, scale=None, softcap=0.0, interleaved=False)
    shapes = [[str(d) for d in p.shape] for p in func.params]
    assert shapes == [["B", "S", "576"], ["B", "S", "192"], ["B", "S", "192"], ["B", "3", "C", "64"],
                      ["B", "3", "C", "64"], ["B"], ["L", "32"], ["L", "32"], ["B"], ["B", "S", "576"]]
    assert [str(p.dtype) for p in func.params][5:] == ["int32", "float32", "float32", "int32", "float32"]
    assert bool(func.attrs["tir.noalias"]) and bool(func.attrs["tir.is_scheduled"])
    assert int(func.attrs["op_pattern"]) == 8
    packed = gqa_prim_func(9, 3, 64, scale=None, softcap=0.0, interleaved=False, packed=True)
    assert [[str(d) for d in p.shape] for p in packed.params][:2] == [["B", "S", "960"], ["B", "3", "C", "64"]]
    assert len(packed.params) == len(func.params) - 2


def test_unsupported_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        gqa_prim_func(9, 2, 64, scale=None, softcap=0.0, interleaved=False)
    with pytest.raises(ValueError, match="head_dim"):
        gqa_prim_func(4, 2, 24, scale=None, softcap=0.0, interleaved=False)
    with pytest.raises(ValueError, match="float32 or int8, got 'float16'"):
        gqa_prim_func(4, 2, 16, scale=None, softcap=0.0, interleaved=False, kv_dtype="float16")
    with pytest.raises(ValueError, match="split_tasks"):
        gqa_prim_func(4, 2, 16, scale=None, softcap=0.0, interleaved=False, split_tasks=0)
    with pytest.raises(ValueError, match="prefetch_bytes must be >= 0, got -1"):
        gqa_prim_func(4, 2, 16, scale=None, softcap=0.0, interleaved=False, prefetch_bytes=-1)


@pytest.mark.parametrize(("S", "seqlens_k", "query_seqlens", "int8"), [
    (1, [299, 40], [1, 1], False),  # decode, split keys
    (7, [4, 36], [5, 7], True),  # prefill chunks, int8 cache (one line per row)
], ids=["decode-f32", "prefill-int8"])
def test_prefetch_changes_no_bit(S, seqlens_k, query_seqlens, int8):
    """Software prefetches of the K and V rows (4 KiB ahead, and far past the capacity) are hints: outputs and
    caches are bit for bit the kernel's without them; the kernel does emit them."""
    feeds = _inputs(4, 2, 64, S, 320, seqlens_k, query_seqlens, int8=int8)
    runs = [_run_tvm(4, 2, 64, None, 0.0, False, {k: v.copy() for k, v in feeds.items()}, split_tasks=4,
                     prefetch_bytes=d) for d in (0, 4096, 1 << 20)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            np.testing.assert_array_equal(a, b)
    asm = [tvm.compile(gqa_prim_func(4, 2, 64, scale=None, softcap=0.0, interleaved=False, prefetch_bytes=d),
                       target=TARGET).mod.inspect_source("asm") for d in (0, 4096)]
    count = [len(re.findall(r"\bprefetcht0\b", a)) for a in asm]
    assert count[0] == 0 < count[1], count


@pytest.mark.parametrize(("S", "seqlens_k", "query_seqlens", "split_tasks", "packed"), [
    (1, [9, 20, 40], [1, 0, 1], 16, False),  # decode, an idle row, split keys
    (1, [300], [1], 4, True),  # decode, long context, packed QKV
    (7, [4, 36], [5, 7], 16, False),  # prefill chunks (right padding, a past)
])
def test_int8_cache(S, seqlens_k, query_seqlens, split_tasks, packed):
    # BindKVCachePass kv_dtype="int8": per (kv head, channel) scales; new entries saturate at [-128, 127]
    feeds, k, v = _check(4, 2, 64, S, 320, seqlens_k, query_seqlens, split_tasks=split_tasks, packed=packed,
                         int8=True)
    assert k.dtype == v.dtype == np.int8
    assert (np.abs(v.astype(np.int32)) >= 127).any(), "some new V entries saturate"
