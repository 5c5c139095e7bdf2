"""collect_matmul_stats on a tiny Llama's canonical graph: every MatMul weight's activation absmax,
mean |x| and Hessian equal what PyTorch forward hooks see on the matching nn.Linear; windows
accumulate; the prefill phase graph works too; act_absmax / hessians views and the errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from twophase.compiler.calibration import act_absmax, collect_matmul_stats, hessians, weighted_matmuls
from twophase.compiler.errors import TwophaseError
from twophase.compiler.options import Phase
from twophase.passes.split_phases import SplitPhasesPass

WINDOWS = np.random.default_rng(0).integers(3, 97, size=(3, 24))


@pytest.fixture(scope="module")
def model(canonical_onnx):
    return ir.load(str(canonical_onnx("gqa")))


@pytest.fixture(scope="module")
def stats(model):
    return collect_matmul_stats(model, WINDOWS, hessian=True, threads=1)


def torch_linear_inputs(torch_model, windows):
    """{id(nn.Linear): (weight.T as numpy [K, N], inputs [T, K] over all windows)}."""
    import torch

    seen: dict[int, list] = {}
    handles = []
    linears = [m for m in torch_model.modules() if isinstance(m, torch.nn.Linear)]
    def recorder(key: int):
        def hook(_mod, args, _out):
            seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy())

        return hook

    for lin in linears:
        handles.append(lin.register_forward_hook(recorder(id(lin))))
    try:
        with torch.no_grad():
            for w in windows:
                torch_model(input_ids=torch.from_numpy(w[None]))
    finally:
        for h in handles:
            h.remove()
    return {id(lin): (lin.weight.detach().numpy().T, np.concatenate(seen[id(lin)])) for lin in linears}


def test_every_weighted_matmul_has_stats(model, stats):
    names = {n.inputs[1].name for n in weighted_matmuls(model.graph)}
    assert set(stats) == names and len(names) == 2 * 7 + 1  # 2 layers x (q k v o gate up down) + lm_head
    for s in stats.values():
        K = s.absmax_K.shape[0]
        assert s.absmax_K.dtype == np.float32 and s.hessian_KK.shape == (K, K) and s.hessian_KK.dtype == np.float64
        assert s.tokens == WINDOWS.size
        np.testing.assert_allclose(s.hessian_KK, s.hessian_KK.T, rtol=1e-6)


def test_stats_equal_torch_hooks(model, stats, tiny_hf_dir):
    pytest.importorskip("torch")
    _, torch_model = tiny_hf_dir("gqa")
    ref = torch_linear_inputs(torch_model, WINDOWS)
    inits = {n.inputs[1].name: n.inputs[1].const_value.numpy() for n in weighted_matmuls(model.graph)}
    matched = 0
    for name, s in stats.items():
        hits = [x for w, x in ref.values() if w.shape == inits[name].shape and np.allclose(w, inits[name])]
        assert hits, f"no nn.Linear has the weight of {name}"
        x = hits[0]  # q/k/v (and gate/up) read the same input, so any match will do
        np.testing.assert_allclose(s.absmax_K, np.abs(x).max(axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.mean_abs_K, np.abs(x).mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.hessian_KK, x.T @ x, rtol=1e-4, atol=1e-3)
        matched += 1
    assert matched == len(stats)


def test_windows_accumulate(model, stats):
    parts = [collect_matmul_stats(model, WINDOWS[i : i + 1], hessian=True, threads=1) for i in range(3)]
    for name, s in stats.items():
        np.testing.assert_allclose(s.absmax_K, np.max([p[name].absmax_K for p in parts], axis=0))
        np.testing.assert_allclose(s.abs_sum_K, sum(p[name].abs_sum_K for p in parts), rtol=1e-10)
        np.testing.assert_allclose(s.hessian_KK, sum(p[name].hessian_KK for p in parts), rtol=1e-10, atol=1e-9)


def test_without_hessian(model):
    st = collect_matmul_stats(model, WINDOWS[:1], threads=1)
    assert all(s.hessian_KK is None for s in st.values())
    with pytest.raises(TwophaseError, match="hessian=True"):
        hessians(st)


def test_shared_activations_share_statistics(stats):
    by_act: dict[str, list] = {}
    for s in stats.values():
        by_act.setdefault(s.activation, []).append(s)
    # per layer: q/k/v share the attention norm's output, gate/up the MLP norm's: 2 x 4 + lm_head
    assert len(by_act) == 2 * 4 + 1
    assert sorted(len(v) for v in by_act.values()) == [1] * 5 + [2] * 2 + [3] * 2


def test_views(stats):
    am = act_absmax(stats)
    assert set(am) == {s.activation for s in stats.values()}
    H = hessians(stats)
    assert set(H) == set(stats) and all(H[k] is stats[k].hessian_KK for k in stats)


def test_model_is_not_modified(model):
    before = [v.name for v in model.graph.outputs]
    collect_matmul_stats(model, WINDOWS[:1], threads=1)
    assert [v.name for v in model.graph.outputs] == before


def test_prefill_phase_graph(model, stats):
    """Same weights and activation names as the canonical graph; the lm_head sees one position per window."""
    prefill = SplitPhasesPass(Phase.PREFILL)(model).model
    st = collect_matmul_stats(prefill, WINDOWS, threads=1)
    assert set(st) == set(stats)
    lm_head = [k for k, s in st.items() if s.tokens == len(WINDOWS)]
    assert len(lm_head) == 1
    for name, s in st.items():
        if name in lm_head:
            continue
        assert s.activation == stats[name].activation
        np.testing.assert_allclose(s.absmax_K, stats[name].absmax_K, rtol=1e-4, atol=1e-5)
    am = act_absmax(st)
    names = {v.name for node in prefill.graph for v in node.inputs if v is not None}
    assert set(am) <= names


def test_errors(model):
    with pytest.raises(TwophaseError, match="at least one window"):
        collect_matmul_stats(model, [], threads=1)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((2, 3), np.float32)))
    mm = ir.node("MatMul", [x, w])
    mm.outputs[0].name = "y"
    g = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 23})
    with pytest.raises(TwophaseError, match="does not know how to feed graph input 'x'"):
        collect_matmul_stats(ir.Model(g, ir_version=10), WINDOWS[:1], threads=1)
