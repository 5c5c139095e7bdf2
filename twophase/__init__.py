"""twophase: compile decoder-only LLMs into separate prefill and decode executables, and run them."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import twophase` stays cheap and the compiler never pulls in the runtime.
    if name == "Engine":
        from twophase.runtime.engine import Engine

        return Engine
    raise AttributeError(name)
