"""CleanupPass: fold constants, drop dead code, re-infer shapes and sort, without touching weights.

Runs after every rewrite that leaves foldable arithmetic or dead nodes behind (SplitPhasesPass runs
it on each phase graph) and once before lowering.

    Before:  c = Shape(x, start=2, end=3)      # x: [B, 2, 0, 8]
             s = Squeeze(c);  t = Add(s, seq_len)
             y = Concat(past_empty, k, axis=-2) # past_empty: [B, 2, 0, 8]
             z = Cos(p);  w = Cos(p)             # duplicated subexpression
             (unused nodes, unused initializers, Constant nodes)
    After:   t = seq_len                         # folded: Shape -> [0], Add(_, 0) -> identity
             y = k                               # zero-length Concat operand dropped
             z = Cos(p)                          # w reuses z
             (dead nodes and initializers gone, constants lifted to initializers,
              shapes re-inferred, nodes topologically sorted)

Made of onnxscript's constant folder and rewrite rules plus onnx_ir's common passes. Folding never
reads a large initializer: a node with any constant input over `input_size_limit` elements is left
alone (this also stops onnxscript's default of folding Transpose(weight) into a new in-memory
copy), and no folded tensor over `output_size_limit` elements is materialized. External weights
therefore stay external, referenced and not loaded.

Preconditions: none beyond a valid model; functions are left as functions (not inlined).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer, rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as common_rules

log = logging.getLogger(__name__)

# Same defaults as onnxscript.optimizer (elements, not bytes).
DEFAULT_INPUT_SIZE_LIMIT = 8192
DEFAULT_OUTPUT_SIZE_LIMIT = 512 * 512


def cleanup_rules() -> pattern.RewriteRuleSet:
    """The algebraic no-op and shape-chain simplifications CleanupPass applies.

    A subset of onnxscript's default rewrite rules: only rules that remove or merge nodes, none that
    change which op computes a result (no Gemm / Conv / BatchNorm fusions).
    """
    return pattern.RewriteRuleSet(
        [
            common_rules.add_0_rule,
            common_rules.sub_0_rule,
            common_rules.mul_by_1_rule,
            common_rules.div_by_1_rule,
            common_rules.dropout_zero_rule,
            common_rules.dropout_inference_rule,
            common_rules.no_op_cast_rule,
            common_rules.no_op_expand_rule,
            common_rules.no_op_transpose_rule,
            common_rules.cast_cast_rule,
            common_rules.reshape_reshape_rule,
            common_rules.transpose_transpose_rule,
            common_rules.unsqueeze_unsqueeze_rule,
            common_rules.squeeze_reshape_1d_rule,
            common_rules.collapse_slice_rule,
            common_rules.collapse_slice2_rule,
            common_rules.materialize_reshape_shape_rule,
            common_rules.cast_constant_of_shape_rule,
            common_rules.cast_constant_of_shape_without_value_rule,
        ],
        commute=True,
    )


class _FoldConstantsPass(ir.passes.InPlacePass):
    """onnxscript's constant folder (with node-level shape inference) as an onnx_ir pass."""

    def __init__(self, input_size_limit: int, output_size_limit: int, should_fold) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.should_fold = should_fold

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = optimizer.fold_constants_ir(
            model,
            onnx_shape_inference=True,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=self.should_fold,
        )
        return ir.passes.PassResult(model, bool(result.modified))


class CleanupPass(ir.passes.InPlacePass):
    """Constant folding, no-op removal, CSE, dead-code removal, shape inference, topological sort.

    Args:
        input_size_limit: never fold a node with a constant input of more elements than this.
        output_size_limit: never materialize a folded tensor of more elements than this.
        steps: rounds of fold + rewrite + dead-code removal (stops early once nothing changes).
        shape_inference: run ONNX shape inference at the end (node-level inference during
            folding always runs).
    """

    def __init__(
        self,
        *,
        input_size_limit: int = DEFAULT_INPUT_SIZE_LIMIT,
        output_size_limit: int = DEFAULT_OUTPUT_SIZE_LIMIT,
        steps: int = 2,
        shape_inference: bool = True,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.steps = steps
        self.shape_inference = shape_inference

    def _should_fold(self, node: ir.Node) -> bool | None:
        """Refuse any node that would read a large constant; else defer to the folder's rules."""
        for value in node.inputs:
            if value is not None and value.const_value is not None:
                if value.const_value.size > self.input_size_limit:
                    return False
        return None

    def _passes(self) -> ir.passes.Sequential:
        fold_loop = ir.passes.PassManager(
            [
                _FoldConstantsPass(self.input_size_limit, self.output_size_limit, self._should_fold),
                rewriter.RewritePass(cleanup_rules()),
                common_passes.RemoveUnusedNodesPass(),
            ],
            steps=self.steps,
            early_stop=True,
        )
        passes: list[ir.passes.PassBase] = [
            fold_loop,
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common_passes.DeduplicateInitializersPass(size_limit=1024),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ]
        if self.shape_inference:
            passes.append(common_passes.ShapeInferencePass())
        passes.append(common_passes.TopologicalSortPass())
        return ir.passes.Sequential(*passes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        result = self._passes()(model)
        log.debug("cleanup: %d -> %d nodes (modified=%s)", before, len(model.graph), result.modified)
        return ir.passes.PassResult(model, result.modified)
