"""Exceptions of natix.quant: each one's message is meant to be shown to a user as is.

The CLI turns every :class:`QuantError` (and :class:`natix.quant.models.ModelLoadError`) into a
one-line message on stderr and a non-zero exit, so messages name the file, module or shapes at
fault rather than relying on a traceback.
"""

from __future__ import annotations


class QuantError(Exception):
    """Base class of user-facing errors raised by natix.quant."""


class AdapterError(QuantError):
    """The adapter cannot be used: missing/corrupt files, unsupported type, or made for another base."""


class MergeParityError(QuantError):
    """The merged model's logits differ from the unmerged adapter's by more than the tolerance."""


class ArtifactError(QuantError):
    """An output artifact cannot be written (e.g. the destination exists and force was not given)."""
