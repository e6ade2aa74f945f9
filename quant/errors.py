"""User-facing errors of natix: each one's message is meant to be shown to a user as is.

:class:`UserError` is the one type every natix CLI (``natix-quant``, ``natix-bench``; see
:mod:`natix.quant.cli_base`) turns into a one-line message on stderr and exit status 1, so messages
name the flag, file, module or shapes at fault rather than relying on a traceback (``--debug``
shows the traceback). Subsystems subclass it (:class:`QuantError` here, ``BenchError`` in
:mod:`natix.bench.matrix`); anything that is not a ``UserError`` (or an ``OSError`` naming a file)
reaching a CLI is a bug and is reported as one.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a directory): one line, exit status 1."""


class QuantError(UserError):
    """Base class of user-facing errors raised by natix.quant."""


class AdapterError(QuantError):
    """The adapter cannot be used: missing/corrupt files, unsupported type, or made for another base."""


class MergeParityError(QuantError):
    """The merged model's logits differ from the unmerged adapter's by more than the tolerance."""


class ArtifactError(QuantError):
    """An artifact cannot be written (the destination exists without force, overlaps an input, is
    not writable) or read back (missing files, or a checkpoint that disagrees with its manifest)."""
