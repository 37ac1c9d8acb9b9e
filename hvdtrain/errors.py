"""The errors users see: one line saying what is wrong and how to fix it, and the exit code that goes with it."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a broken setup. The CLI prints `hvdtrain: error: <message>` and exits with `exit_code`.

    `agreed` means every rank raises this same error (it was decided collectively, or every rank read the same
    bad input), so rank 0 alone prints it; an error only one rank saw is printed by that rank.
    """

    exit_code = 2

    def __init__(self, message: str, *, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


class DataError(UserError):
    """Unreadable, corrupt or malformed input data (found before training or in the middle of it)."""


class NonFiniteLoss(UserError):
    """The loss or the weights became NaN/Inf on some rank; all ranks stopped at the same step."""

    exit_code = 3


class CollectiveFailure(UserError):
    """A collective failed because a peer rank died, stalled or lost its network."""

    exit_code = 4


def require(module: str, extra: str, what: str):
    """Import an optional dependency (setup.cfg's extras), or stop with the one line that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f'{what} needs {module}, which is not installed here: pip install "hvdtrain[{extra}]"') from None


def first_line(exc: BaseException, prefer: tuple[str, ...] = ()) -> str:
    """The most telling line of an exception's text: the last line containing one of `prefer`, else the first line.

    TensorFlow's messages carry graph internals (`{{function_node __wrapped__...}}`, `[[node ...]]`): those are cut.
    """
    lines = [_strip_tf_internals(line) for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    preferred = [line for line in lines if any(mark in line for mark in prefer)]
    return (preferred[-1:] or lines[:1] or [type(exc).__name__])[0][:400]


def _strip_tf_internals(line: str) -> str:
    import re
    line = re.sub(r"\{\{function_node [^}]*\}\}", "", line)
    line = re.sub(r"\[\[\{\{node [^}]*\}\}\]\]", "", line)
    line = re.sub(r"\[Op:[^\]]*\]", "", line)
    return line.strip().rstrip(".").strip()
