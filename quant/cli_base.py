"""What every natix CLI shares: one-line errors with fixed exit codes, ``--debug``, SIGTERM
cleanup, and the click parameter types that validate values before any work starts.

``natix-quant`` and ``natix-bench`` are :class:`NatixGroup` s. Whatever a command raises ends as:

- a :class:`~natix.quant.errors.UserError` (bad flag value found by our own checks, bad file,
  bad directory) or an ``OSError`` (the file it names): ``Error: <one line>``, exit status 1;
- a click usage error (unknown option, a value of the wrong type or out of range): one line
  ``Error: <problem> (see '<command> -h')``, exit status 2;
- SIGTERM / SIGHUP: the process's temporary directories are removed and it exits with status
  128 + signal number (:func:`terminate_on_signals`);
- anything else is a bug in natix: one line that says so, exit status 1.

``--debug`` (before or after the command name) lets every exception through with its traceback.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from natix.quant.errors import UserError
from natix.quant.tempdirs import remove_owned
from natix.quant.validate import check_text, is_device

_DEBUG_KEY = "natix.debug"


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """On SIGTERM or SIGHUP: remove this process's temporary directories (parked old outputs go
    back first; :func:`natix.quant.tempdirs.remove_owned`), say so, and exit with 128 + the signal
    number. The handler exits itself rather than raising: an exception raised from a signal
    handler lands wherever the interpreter happens to be, and inside a ``__del__`` it is printed
    and dropped, so the run would go on (measured: a SIGTERM during export, then exit status 0).
    The previous handlers are back afterwards (main thread only)."""
    signums = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])

    def handler(signum: int, _frame: Any) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        remove_owned()
        try:
            sys.stdout.flush()
            if sys.stderr.isatty():  # a rich status line may be showing, with the cursor hidden
                sys.stderr.write("\x1b[?25h\n")
            click.echo(f"Error: terminated by {signal.Signals(signum).name}; temporary files removed", err=True)
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)

    try:
        previous = {s: signal.signal(s, handler) for s in signums}
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class OneLineUsageError(click.UsageError):
    """A usage error shown as a single line (click's default prints the usage block first)."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} -h')" if self.ctx is not None else ""
        click.echo(f"Error: {one_line(self.format_message())}{hint}", file=file, err=True)


def _as_click_error(e: BaseException, ctx: click.Context) -> BaseException | None:
    """The click exception that reports ``e`` (None: let ``e`` through as it is)."""
    if isinstance(e, (click.exceptions.Exit, click.Abort, click.exceptions.NoArgsIsHelpError,
                      OneLineUsageError, KeyboardInterrupt, SystemExit)):
        return None
    if isinstance(e, click.UsageError):
        return OneLineUsageError(e.format_message(), e.ctx or ctx)
    if isinstance(e, click.ClickException):
        return None
    if isinstance(e, UserError):
        return click.ClickException(one_line(str(e)))
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return click.ClickException(one_line(f"{e.strerror or e}{where}"))
    if isinstance(e, Exception):
        return click.ClickException(one_line(
            f"internal error (a bug in natix, please report it): {type(e).__name__}: {e} "
            "-- rerun with --debug for the traceback"))
    return None


class _Note(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"note: {record.getMessage()}", err=True)


@contextmanager
def _notes_on_stderr() -> Iterator[None]:
    """Show the ``natix`` logger's warnings (e.g. stale temporaries removed) as ``note:`` lines."""
    log = logging.getLogger("natix")
    handler, propagate = _Note(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG_KEY] = True


def _debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the full traceback of any error.")


class NatixCommand(click.Command):
    """A command with ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(_debug_option())


class NatixGroup(click.Group):
    """A command group whose commands report errors as the module docstring says."""

    command_class = NatixCommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(_debug_option())

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            if isinstance(e, (click.exceptions.NoArgsIsHelpError, OneLineUsageError)):
                raise
            raise OneLineUsageError(e.format_message(), e.ctx) from e

    def invoke(self, ctx: click.Context) -> Any:
        with terminate_on_signals(), _notes_on_stderr():
            try:
                return super().invoke(ctx)
            except BaseException as e:
                if ctx.meta.get(_DEBUG_KEY) and not isinstance(e, (click.exceptions.Exit, click.Abort)):
                    raise
                replacement = _as_click_error(e, ctx)
                if replacement is None:
                    raise
                raise replacement from e


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(_DEBUG_KEY))


# ---------------------------------------------------------------------------------- parameter types
class FiniteFloat(click.FloatRange):
    """A float in range that is neither NaN nor infinite (``click.FloatRange`` lets NaN through:
    every comparison with NaN is false)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class Text(click.ParamType):
    """A string that must be valid UTF-8 (see :func:`check_text`)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return check_text(str(value), "value")
        except UserError as e:
            self.fail(str(e), param, ctx)


class PathArg(click.Path):
    """``click.Path`` that must be valid UTF-8 (see :func:`check_text`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            check_text(str(value), "path")
        except UserError as e:
            self.fail(str(e), param, ctx)
        return super().convert(value, param, ctx)


class Device(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists is checked before use:
    :func:`natix.quant.validate.check_device`)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not is_device(value):
            self.fail(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps", param, ctx)
        return value


TEXT = Text()
DEVICE = Device()
POSITIVE_INT = click.IntRange(min=1)


def progress_console() -> Any:
    """The stderr console long commands show progress and results on (rich, imported lazily)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


__all__ = ["DEVICE", "POSITIVE_INT", "TEXT", "Device", "FiniteFloat", "NatixCommand", "NatixGroup",
           "OneLineUsageError", "PathArg", "debug_enabled", "one_line", "progress_console"]
