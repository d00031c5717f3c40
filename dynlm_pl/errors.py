"""One exception type for every user-facing failure.

Entry points catch `DynlmError` and print its message as one line on stderr with a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DynlmError(RuntimeError):
    """A problem the user can fix: the message says what was wrong and what to do."""

    exit_code = 2
    label = "error"


class Stopped(DynlmError):
    """A run stopped by SIGTERM or Ctrl-C after writing its resume checkpoint: `stopped: ...`, exit status 143 (the
    shell's 128 + SIGTERM), so schedulers and scripts see that it did not finish."""

    exit_code = 143
    label = "stopped"


def require(cond: bool, message: str) -> None:
    if not cond:
        raise DynlmError(message)
