"""fast_macros: kernels built with the frame-walking parser lookup are the PrimFuncs TVM's own lookup builds,
TVM's lookup is back in place afterwards (also after an error), and nested builders restore it once."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from tvm.script.parser.core.parser import ScriptMacro  # noqa: E402

from twophase.kernels.tir import qgemv_a8  # noqa: E402
from twophase.kernels.tir.attention import gqa_prim_func  # noqa: E402
from twophase.kernels.tir.fusion import Fusion, Prologue  # noqa: E402
from twophase.kernels.tir.qmatmul_int8 import Isa  # noqa: E402
from twophase.kernels.tir.script import fast_macros  # noqa: E402

SPEC = qgemv_a8.QGemvA8Spec(4, 100, 45, 32, has_offset=True)


@pytest.mark.parametrize("build", [
    lambda: qgemv_a8.prim_func(SPEC, isa=Isa.AVX512_VNNI, fusion=Fusion(Prologue.RMS_NORM, 1e-5, True)),
    lambda: gqa_prim_func(4, 2, 16, scale=None, softcap=0.0, interleaved=False, packed=True),
], ids=["qgemv_a8+norm+residual", "gqa"])
def test_same_prim_func_as_tvm_lookup(build):
    fast = build()
    original = ScriptMacro.__dict__["_find_parser_def"]
    with pytest.MonkeyPatch.context() as mp:  # the builders leave TVM's lookup in place
        mp.setattr("twophase.kernels.tir.script._script_macro", lambda: None)
        slow = build()
    assert ScriptMacro.__dict__["_find_parser_def"] is original
    tvm.ir.assert_structural_equal(fast, slow)


def test_lookup_restored_after_error_and_nesting():
    original = ScriptMacro.__dict__["_find_parser_def"]
    seen = []

    @fast_macros
    def inner():
        seen.append(ScriptMacro.__dict__["_find_parser_def"])

    @fast_macros
    def outer():
        inner()
        seen.append(ScriptMacro.__dict__["_find_parser_def"])
        raise ValueError("bad kernel")

    with pytest.raises(ValueError, match="bad kernel"):
        outer()
    assert seen[0] is seen[1] and seen[0] is not original  # swapped for the whole outer build, inner included
    assert ScriptMacro.__dict__["_find_parser_def"] is original
