"""FuseTVMElementwisePass: the norms, gated activations and residual adds around twophase.tvm.QMatMul move
into the matmul kernel (TVM target).

A decode step of a small model is a chain of short kernels, and each one costs a VM call, a thread-pool
round trip and a pass over memory; after PackProjectionsPass a Llama layer is QKV -> attention -> O ->
gate|up -> down, and these rules leave exactly those five kernels (kernels/tir/fusion.py computes the folded
work in the kernel's prologue / epilogue):

    RMSNorm rule:
        Before:  n = RMSNormalization(x, gamma, axis=-1, epsilon);  y_i = QMatMul_i(n, P_i...)   (every reader)
        After:   y_i = QMatMul_i(x, P_i..., gamma, prologue="rms_norm", epsilon)
    SwiGLU rule (gate and up packed into one [.., 2K] output, gate first):
        Before:  g, u = Split(p, [K, K], axis=-1);  h = Mul(Mul(g, Sigmoid(g)), u);  y = QMatMul(h, P...)
        After:   y = QMatMul(p, P..., prologue="swiglu")
    Residual rule:
        Before:  z = Add(r, QMatMul(x, P...))          (either operand order; same shape, no broadcast)
        After:   z = QMatMul(x, P..., r, residual=1)

Inputs of the fused node: x, the kernel arrays P, then gamma (rms_norm), then r (residual). A value that
something else also reads (a norm output, the Split's halves, the matmul output) is not folded. Numerics are
those of the float32 ops (silu through a vectorized exp, about 1 ulp).

Pipeline: TVM target, after FuseTVMKernelsPass and PackProjectionsPass; its output is for lower_tvm.py only.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from twophase.passes.fuse_dequant_matmul import replace_node

log = logging.getLogger(__name__)

TVM_DOMAIN = "twophase.tvm"
_ONNX = ("", "ai.onnx")


def _is(node: ir.Node | None, op_type: str, domain: tuple[str, ...] = _ONNX) -> bool:
    return node is not None and node.op_type == op_type and node.domain in domain


def _qmatmul(node: ir.Node | None) -> bool:
    return _is(node, "QMatMul", (TVM_DOMAIN,))


def _only_reader(value: ir.Value | None, node: ir.Node) -> bool:
    if value is None or value.is_graph_output():
        return False
    return [n for n, _ in value.uses()] == [node]


def _attrs(node: ir.Node, **extra: ir.Attr) -> list[ir.Attr]:
    return [a for k, a in node.attributes.items() if k not in extra] + list(extra.values())


class FuseTVMElementwisePass(ir.passes.InPlacePass):
    """RMSNorm / SwiGLU prologues and residual epilogues into twophase.tvm.QMatMul (module doc).
    After a call, `applied` counts rewrites per rule."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: Counter[str] = Counter()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.applied = Counter()
        graph = model.graph
        for node in list(graph):
            if _is(node, "RMSNormalization"):
                self._norm(graph, node)
        for node in list(graph):
            if _qmatmul(node) and "prologue" not in node.attributes:
                self._swiglu(graph, node)
        for node in list(graph):
            if _is(node, "Add"):
                self._residual(graph, node)
        log.info("TVM elementwise fusions: %s", dict(self.applied))
        return ir.passes.PassResult(model, modified=sum(self.applied.values()) > 0)

    def _norm(self, graph: ir.Graph, norm: ir.Node) -> None:
        x, gamma = norm.inputs[0], norm.inputs[1] if len(norm.inputs) > 1 else None
        out = norm.outputs[0]
        if x is None or gamma is None or gamma.const_value is None or out.is_graph_output():
            return
        axis = norm.attributes.get_int("axis", -1)
        rank = len(x.shape) if x.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1):
            return
        g = gamma.const_value.numpy()
        readers = list(out.uses())
        if g.ndim != 1 or g.dtype != np.float32 or not readers:
            return
        if any(idx != 0 or not _qmatmul(n) or "prologue" in n.attributes or n.attributes.get_int("K") != g.shape[0]
               for n, idx in readers):
            return
        eps = norm.attributes.get_float("epsilon", 1e-5)
        for reader in {id(n): n for n, _ in readers}.values():
            fused = ir.Node(TVM_DOMAIN, "QMatMul", [x, *reader.inputs[1:], gamma],
                            _attrs(reader, prologue=ir.AttrString("prologue", "rms_norm"),
                                   epsilon=ir.AttrFloat32("epsilon", eps)), name=f"{reader.name}.norm")
            replace_node(graph, reader, fused)
            self.applied["rms_norm"] += 1
        graph.remove(norm, safe=True)

    def _swiglu(self, graph: ir.Graph, down: ir.Node) -> None:
        h = down.inputs[0]
        mul = h.producer() if h is not None else None
        if not _is(mul, "Mul") or not _only_reader(h, down):
            return
        K = down.attributes.get_int("K")
        for silu_value, u in (mul.inputs, mul.inputs[::-1]):
            silu = silu_value.producer() if silu_value is not None else None
            if not _is(silu, "Mul") or not _only_reader(silu_value, mul):
                continue
            for g, sig_value in (silu.inputs, silu.inputs[::-1]):
                sig = sig_value.producer() if sig_value is not None else None
                if not _is(sig, "Sigmoid") or sig.inputs[0] is not g or not _only_reader(sig_value, silu):
                    continue
                split = g.producer()
                if not _is(split, "Split") or u is None or u.producer() is not split or len(split.outputs) != 2:
                    continue
                if split.outputs[0] is not g or split.outputs[1] is not u:
                    continue  # the kernel reads the gate from the first half
                g_readers = [n for n, _ in g.uses()]
                if g.is_graph_output() or len(g_readers) != 2 or {id(n) for n in g_readers} != {id(sig), id(silu)}:
                    continue
                if not _only_reader(u, mul):
                    continue
                if split.attributes.get_int("axis", 0) not in (-1, len(g.shape) - 1 if g.shape is not None else -1):
                    continue
                sizes = split.inputs[1] if len(split.inputs) > 1 else None
                if sizes is None or sizes.const_value is None or sizes.const_value.numpy().tolist() != [K, K]:
                    continue
                fused = ir.Node(TVM_DOMAIN, "QMatMul", [split.inputs[0], *down.inputs[1:]],
                                _attrs(down, prologue=ir.AttrString("prologue", "swiglu")), name=f"{down.name}.swiglu")
                replace_node(graph, down, fused)
                for dead in (mul, silu, sig, split):
                    graph.remove(dead, safe=True)
                self.applied["swiglu"] += 1
                return

    def _residual(self, graph: ir.Graph, add: ir.Node) -> None:
        a, b = add.inputs
        for y, r in ((a, b), (b, a)):
            mm = y.producer() if y is not None else None
            if not _qmatmul(mm) or "residual" in mm.attributes or not _only_reader(y, add) or r is None:
                continue
            if y.shape is None or r.shape is None or len(y.shape) != len(r.shape):
                continue
            if any(p != q for p, q in zip(y.shape, r.shape)) or r.dtype != ir.DataType.FLOAT:
                continue
            fused = ir.Node(TVM_DOMAIN, "QMatMul", [*mm.inputs, r], _attrs(mm, residual=ir.AttrInt64("residual", 1)),
                            name=f"{mm.name}.residual")
            replace_node(graph, add, fused)
            graph.remove(mm, safe=True)
            self.applied["residual"] += 1
            return
