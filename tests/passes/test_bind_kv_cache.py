"""BindKVCachePass on the tiny decoders: graph diff, numerics of the bound graphs against the unbound
phase graphs (each row alone; batched, chunked, different lengths), int8 cache, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from passes.ort_helpers import checked_session
from twophase.compiler.graph_diff import diff_models
from twophase.compiler.options import Phase
from twophase.passes.bind_kv_cache import BindKVCacheError, BindKVCachePass, match_layers
from twophase.passes.cleanup import CleanupPass
from twophase.passes.split_phases import SplitPhasesPass

GQA = "com.microsoft::GroupQueryAttention"
MAX_LEN = 64
CAPACITY = 24


def _phase(canonical: ir.Model, phase: Phase) -> ir.Model:
    return SplitPhasesPass(phase)(canonical).model


def _bound(model: ir.Model, **kwargs) -> ir.Model:
    bound = model.clone()
    BindKVCachePass(MAX_LEN, **kwargs)(bound)
    CleanupPass()(bound)
    return bound


def _facts(model: ir.Model) -> dict:
    return json.loads(model.metadata_props["twophase.model_facts"])


def _reference(sessions, facts, rows, steps):
    """Unbound graphs, one row at a time: logits after the prompt and after each greedy decode step."""
    prefill, decode = sessions
    out = []
    for r in rows:
        n = len(r)
        o = prefill.run(None, {"input_ids": r[None], "attention_mask": np.ones((1, n), np.int64),
                               "position_ids": np.arange(n)[None]})
        logits, past = [o[0][0, -1]], o[1:]
        for s in range(steps):
            t = n + s
            feeds = {"input_ids": np.array([[int(np.argmax(logits[-1]))]]), "attention_mask": np.ones((1, t + 1), np.int64),
                     "position_ids": np.array([[t]])}
            feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)})
            o = decode.run(None, feeds)
            logits.append(o[0][0, -1])
            past = o[1:]
        out.append(np.stack(logits))
    return out


def _run_bound(session, buffers, ids, q, done):
    import onnxruntime as ort

    io = session.io_binding()
    total = done + q
    io.bind_cpu_input("input_ids", ids)
    io.bind_cpu_input("seqlens_k", (np.maximum(total, 1) - 1).astype(np.int32))
    io.bind_cpu_input("total_sequence_length", np.array(total.max(), np.int32))
    io.bind_cpu_input("query_seqlens", q.astype(np.int32))
    io.bind_output("logits")
    for name, value in buffers.items():
        io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    session.run_with_iobinding(io)
    assert isinstance(buffers, dict) and all(isinstance(v, ort.OrtValue) for v in buffers.values())
    return io.get_outputs()[0].numpy()[:, -1]


def _bound_logits(sessions, facts, rows, steps, chunk, kv_dtype=np.float32):
    """Bound graphs on the whole batch: chunked right-padded prefill, then greedy decode steps."""
    import onnxruntime as ort

    prefill, decode = sessions
    B, lens = len(rows), np.array([len(r) for r in rows])
    shape = (B, facts["num_kv_heads"], CAPACITY, facts["head_dim"])
    arrays = {f"past_key_values.{i}.{kv}": np.zeros(shape, kv_dtype)
              for i in range(facts["num_layers"]) for kv in ("key", "value")}
    buffers = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
    done = np.zeros(B, np.int64)
    got = [[None] for _ in rows]
    while (done < lens).any():
        q = np.minimum(lens - done, chunk)
        ids = np.zeros((B, int(q.max())), np.int64)
        for b in range(B):
            ids[b, : q[b]] = rows[b][done[b] : done[b] + q[b]]
        logits = _run_bound(prefill, buffers, ids, q, done)
        for b in np.flatnonzero((q > 0) & (done + q == lens)):
            got[b][0] = logits[b]
        done += q
    for _ in range(steps):
        tokens = np.array([[int(np.argmax(g[-1]))] for g in got])
        logits = _run_bound(decode, buffers, tokens, np.ones(B, np.int64), done)
        done += 1
        for b in range(B):
            got[b].append(logits[b])
    return [np.stack(g) for g in got], arrays


@pytest.fixture(scope="module")
def tiny_phases(canonical_onnx, tmp_path_factory):
    """config -> (canonical, unbound sessions, bound models)."""
    import onnx

    cache = {}

    def make(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(f"bind-{name}")
            canonical = ir.from_proto(onnx.load(str(canonical_onnx(name))))
            phases = {p: _phase(canonical, p) for p in Phase}
            unbound = tuple(checked_session(phases[p], d / f"{p.value}.onnx") for p in Phase)
            cache[name] = (canonical, phases, unbound, d)
        return cache[name]

    return make


@pytest.mark.parametrize("name", ["gqa16", "mha16"])
def test_graph_diff(tiny_phases, name):
    canonical, phases, _, _ = tiny_phases(name)
    facts = _facts(canonical)
    L = facts["num_layers"]
    for phase in Phase:
        before = phases[phase]
        after = _bound(before)
        d = diff_models(before, after)
        assert d.op_delta["Attention"] == -L and d.op_delta["RotaryEmbedding"] == -2 * L
        assert d.op_delta[GQA] == L
        names = {v.name: v for v in after.graph.inputs}
        assert {"seqlens_k", "total_sequence_length", "query_seqlens"} <= set(names)
        assert "attention_mask" not in names and "position_ids" not in names
        assert names["seqlens_k"].dtype == ir.DataType.INT32 and names["total_sequence_length"].shape == ir.Shape([])
        past = names["past_key_values.0.key"]
        assert past.shape[1] == facts["num_kv_heads"] and past.shape[3] == facts["head_dim"]
        assert isinstance(past.shape[2], ir.SymbolicDim)  # the capacity is the runtime's choice
        cos = after.graph.initializers["twophase_rotary_cos"].const_value.numpy()
        assert cos.shape == (MAX_LEN, facts["head_dim"] // 2)
        np.testing.assert_allclose(cos[0], 1.0)  # position 0: no rotation
        assert after.metadata_props["twophase.kv_binding"] == "bound"
        if phase is Phase.PREFILL:
            assert any(n.op_type == "GatherND" for n in after.graph)  # per-row last valid token


@pytest.mark.parametrize("name", ["gqa16", "mha16"])
@pytest.mark.parametrize("chunk", [3, 64])
def test_bound_graphs_match_unbound_rows_alone(tiny_phases, name, chunk):
    canonical, phases, unbound, d = tiny_phases(name)
    facts = _facts(canonical)
    bound = tuple(checked_session(_bound(phases[p]), d / f"bound-{p.value}-{chunk}.onnx") for p in Phase)
    rng = np.random.default_rng(1)
    rows = [rng.integers(3, facts["vocab_size"], n) for n in (7, 2, 5)]
    ref = _reference(unbound, facts, rows, steps=4)
    got, _ = _bound_logits(bound, facts, rows, steps=4, chunk=chunk)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)
    # batch 1 as well
    got1, _ = _bound_logits(bound, facts, rows[:1], steps=4, chunk=chunk)
    np.testing.assert_allclose(got1[0], ref[0], atol=2e-5, rtol=1e-4)


def test_int8_cache_is_close_and_stores_int8(tiny_phases):
    canonical, phases, unbound, d = tiny_phases("gqa16")
    facts = _facts(canonical)
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, facts["vocab_size"], n) for n in (6, 4)]
    # scales from the float cache of these very rows (what calibration does on text)
    _, arrays = _bound_logits(
        tuple(checked_session(_bound(phases[p]), d / f"f-{p.value}.onnx") for p in Phase), facts, rows, 3, 64
    )
    scales = {i: tuple(np.abs(arrays[f"past_key_values.{i}.{kv}"]).max(axis=(0, 2)) / 127 + 1e-8 for kv in ("key", "value"))
              for i in range(facts["num_layers"])}
    int8 = tuple(
        checked_session(_bound(phases[p], kv_dtype="int8", kv_scales=scales), d / f"q-{p.value}.onnx") for p in Phase
    )
    ref = _reference(unbound, facts, rows, steps=3)
    got, q_arrays = _bound_logits(int8, facts, rows, 3, 64, kv_dtype=np.int8)
    assert q_arrays["past_key_values.0.key"].dtype == np.int8 and np.abs(q_arrays["past_key_values.0.key"]).max() > 64
    for g, r in zip(got, ref):
        assert np.abs(g - r).max() < 0.05 * np.abs(r).max()
        assert (g.argmax(-1) == r.argmax(-1)).mean() >= 0.75


def test_refuses_head_dim_not_multiple_of_16(canonical_onnx):
    import onnx

    canonical = ir.from_proto(onnx.load(str(canonical_onnx("gqa"))))  # head_dim 8
    with pytest.raises(BindKVCacheError, match="head_dim 8 is not a multiple of 16"):
        match_layers(canonical.graph)


def test_refuses_graph_without_attention_op():
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 23})
    with pytest.raises(BindKVCacheError, match="no opset-23 Attention"):
        match_layers(graph)


def test_refuses_int8_without_scales():
    with pytest.raises(ValueError, match="kv_scales"):
        BindKVCachePass(64, kv_dtype="int8")
