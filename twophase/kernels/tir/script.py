"""Building TVMScript kernels quickly: `fast_macros`, a decorator for the functions that parse a kernel.

TVM 0.27 looks up the active parser at every `T.macro` call (`ScriptMacro._find_parser_def`) through
`inspect.getouterframes`, which makes a `FrameInfo` for every frame on the stack: each reads source lines,
and `inspect.getmodule` scans all of `sys.modules` for frames it has not seen. A kernel here calls macros
thousands of times under a deep stack (the parser's recursive visitors), so with torch and transformers
imported (2000+ modules) building one GEMV took 1.4-12 s, nearly all of it in `inspect`; the SmolLM2 TVM
compile builds dozens. `fast_macros` does the same search (the innermost frame whose globals hold the parser)
by walking `f_back`, which reads no source: the same PrimFunc (structurally equal, tested) in ~0.2 s.

The lookup is swapped only while a decorated builder runs, and only where TVM has the method this replaces;
elsewhere TVM's own runs.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_depth = 0  # decorated builders running (one may call another)
_saved: Any = None


def _find_parser_def(self: Any) -> Any:
    """ScriptMacro._find_parser_def without FrameInfo: the innermost frame whose globals hold the parser."""
    from tvm.script.parser.core.parser import ScriptMacro

    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def _script_macro() -> Any:
    try:
        from tvm.script.parser.core.parser import ScriptMacro
    except ImportError:
        return None
    return ScriptMacro if callable(ScriptMacro.__dict__.get("_find_parser_def")) else None  # what wrapper swaps


def fast_macros(build: F) -> F:
    """Run `build` (a function that parses TVMScript) with the frame-walking parser lookup (module doc)."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth, _saved
        cls = _script_macro()
        if cls is None:
            return build(*args, **kwargs)
        with _lock:
            if _depth == 0:
                _saved = cls.__dict__["_find_parser_def"]
                cls._find_parser_def = _find_parser_def
            _depth += 1
        try:
            return build(*args, **kwargs)
        finally:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    cls._find_parser_def = _saved
                    _saved = None

    return wrapper  # type: ignore[return-value]
