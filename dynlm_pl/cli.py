"""What the entry points share: every error a user can fix ends as one line on stderr with exit status 2.

Imports neither torch nor Lightning, so a bad command line is refused before they load.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from dynlm_pl.errors import DynlmError


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS (Linux; a no-op elsewhere).

    Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on
    free, so each parameter-sized temporary of a model's size (the flat gradient, θ − θ_0, the dense embedding
    gradient) page-faults all its pages in again, every segment (`bench/bench_eval.py --profile` shows it;
    `DYNLM_MALLOC_KEEP=0` for glibc's default). The cost: RSS stays at its peak once reached. Called by the entry
    points (`main_guard`) and the benches; returns whether set.
    """
    if os.environ.get("DYNLM_MALLOC_KEEP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        # no mmap'd chunks (all from the heap), and never trim the heap's top back to the OS
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def one_line_per_log_record() -> None:
    """Lightning gives its `lightning` logger a stderr handler of its own and still lets records propagate to the
    root logger, which Hydra's job logging prints (and writes to the job's log file): every Lightning line came out
    twice. With a root handler in place, drop Lightning's."""
    lg = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)


def main_guard(fn: Callable[[], Any]) -> Any:
    """Turn a DynlmError into one line on stderr and exit status 2 (143 for a run stopped by a signal, `Stopped`),
    tune the allocator (`keep_freed_memory`) and print each log record once (`one_line_per_log_record`)."""
    keep_freed_memory()
    one_line_per_log_record()
    try:
        return fn()
    except DynlmError as e:
        print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


# Errors a user makes on the command line or with the file system, which Hydra itself reports over several lines
# (exit status 1) before or around our code: shortened to one line, exit status 2, like DynlmError.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC, errno.EDQUOT,
                   errno.EFBIG}


def _one_line(e: BaseException) -> str:
    """Hydra's multi-line message as one line: options listed on tab-indented lines become a comma list."""
    text = str(e).split("Config search path:")[0]
    text = re.sub(r":\s*\n\t", ": ", text)
    text = re.sub(r"\n\t", ", ", text)
    parts = [t.strip() for t in text.splitlines() if t.strip()]
    line = "".join(t + ("" if i == len(parts) - 1 else " " if t[-1] in ".:;," else "; ") for i, t in enumerate(parts))
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        line += f" ({str(cause).strip().splitlines()[0]})"
    return line


def cli(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry point so that every error the user can fix is one line on stderr, exit 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise what it would otherwise print as a multi-line report with exit status 1
    (an unknown key or option, an unparsable override, an output directory it cannot create); those are
    shortened here. Any other exception is a bug and keeps its full traceback.
    """
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as e:
        print(f"error: bad command line: {_one_line(e)}; see `python {os.path.basename(sys.argv[0])} --help`",
              file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        print(f"error: cannot write {e.filename}: {e.strerror}; set paths.root to a writable directory "
              "with free space", file=sys.stderr, flush=True)
        sys.exit(2)
