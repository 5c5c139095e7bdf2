"""The exceptions twophase raises on bad input.

Every message names the thing at fault (file, node, field, tensor) and says what to do.
Pure Python: the runtime imports this module too.
"""

from __future__ import annotations


class TwophaseError(Exception):
    """Base class of every error twophase raises on purpose."""


class UnknownSourceError(TwophaseError):
    """A model source (zoo name, path) that does not resolve to anything loadable."""


class UnsupportedModelError(TwophaseError):
    """A model whose architecture or graph twophase cannot compile."""


class GraphContractError(UnsupportedModelError):
    """An ONNX graph that does not fit the canonical decoder contract (see DESIGN.md)."""


class PassError(TwophaseError):
    """A graph pass whose preconditions do not hold."""


class ArtifactError(TwophaseError):
    """A compiled artifact that is missing, incomplete, tampered with or of an unknown format."""


class ContextLengthError(TwophaseError):
    """A request that would run past the model's (or the artifact's) maximum context."""


class DownloadError(TwophaseError):
    """A model-zoo package that could not be fetched or did not verify."""
