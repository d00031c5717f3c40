"""Writing files so that a reader sees the old file or the whole new one, never half of either; hashing them; one
writer per run directory (`RunLock`)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from dynlm_pl.errors import DynlmError

log = logging.getLogger(__name__)


def tmp_beside(path: Path) -> Path:
    """A fresh, empty temporary file in `path`'s directory (same file system, so a rename is atomic), with the
    permissions a plainly created file gets (mkstemp's are 0600: a shared data or run directory would become
    unreadable to the other users)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return Path(tmp)


# A full disk, a quota, or a file-size limit (ulimit -f, RLIMIT_FSIZE: EFBIG)
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file larger than the file-size limit"}


TORCH_WRITE_FAILED = ("write failed", "iostream error", "unexpected pos")


def disk_full(exc: BaseException) -> str | None:
    """Why `exc` (or an exception it was raised from) is a full disk, a quota or a file-size limit; None if not.
    torch.save reports a failed write as a RuntimeError of its zip writer ('file write failed', 'iostream error',
    'unexpected pos') without the errno."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return DISK_FULL[exc.errno]
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_WRITE_FAILED):
            return "the write failed (a full disk or a file-size limit)"
        exc = exc.__cause__ or exc.__context__
    return None


def atomic_write(dst: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `dst`, which then replaces `dst` in one rename.

    A failure (a full disk, a kill) leaves `dst` as it was and removes the temporary file; a full disk or a
    file-size limit is a one-line DynlmError.
    """
    dst = Path(dst)
    tmp = tmp_beside(dst)
    try:
        write(tmp)
        os.replace(tmp, dst)
    except (OSError, RuntimeError) as e:
        why = disk_full(e)
        if why is None:
            raise
        raise DynlmError(f"cannot write {dst}: {why}; the previous {dst.name} (if any) is kept: free some space "
                         "(or raise the limit) and rerun") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(dst: str | Path, data: bytes) -> None:
    atomic_write(dst, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(dst: str | Path, text: str) -> None:
    atomic_write_bytes(dst, text.encode("utf-8"))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def link_or_copy(src: Path, dst: Path) -> None:
    """Replace `dst` by a hard link to `src` (a copy where links are not possible), atomically."""

    def write(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunLock:
    """One writer per run directory: `<dir>/.lock` names its holder (pid, host, stage, start time).

    Taken by linking a complete temporary file to the lock's name, which fails if it exists (atomic, also on NFS),
    so a reader never sees half a holder. A lock whose pid is gone on this host (a killed run), or that this SLURM
    job took before it was requeued (the same SLURM_JOB_ID, maybe on another node), is taken over with a one-line
    notice; a live holder, or one on another host (whose pid cannot be checked), is refused with a one-line
    error. Re-entrant within a process (stage=all takes it, then evaluate inside it).
    """

    _held: ClassVar[dict[Path, int]] = {}  # lock path -> nesting depth, in this process

    def __init__(self, directory: Path, stage: str) -> None:
        self.path, self.stage = Path(directory) / ".lock", stage

    def __enter__(self) -> RunLock:
        if self._held.get(self.path):
            self._held[self.path] += 1
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "job": os.environ.get("SLURM_JOB_ID")}
        if not self._link(info):
            holder = self._holder()
            gone = holder.get("host") == info["host"] and not _alive(int(holder.get("pid", -1)))
            requeued = info["job"] is not None and holder.get("job") == info["job"]  # this SLURM job, before
            if gone or requeued:
                log.warning(f"[dynlm] taking over {self.path}: its holder, pid {holder.get('pid')} "
                            f"({holder.get('stage')}, since {holder.get('started')}), is gone")
                self.path.unlink(missing_ok=True)
            if not self._link(info):
                h = self._holder()
                raise DynlmError(f"run directory {self.path.parent} is in use by pid {h.get('pid', '?')} on "
                                 f"{h.get('host', '?')} ({h.get('stage', '?')}, since {h.get('started', '?')}); wait "
                                 f"for it to finish or use another name= (delete {self.path} only if it is gone)")
        self._held[self.path] = 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._held[self.path] -= 1
        if self._held[self.path] == 0:
            del self._held[self.path]
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def _link(self, info: dict[str, object]) -> bool:
        tmp = tmp_beside(self.path)
        try:
            tmp.write_text(json.dumps(info))
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return {}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
