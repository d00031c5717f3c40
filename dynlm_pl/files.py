"""Writing files so that a reader sees the old file or the whole new one, never half of either; hashing them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def atomic_write(dst: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `dst`, which then replaces `dst` in one rename.

    A failure (a full disk, a kill) leaves `dst` as it was and removes the temporary file.
    """
    dst = Path(dst)
    tmp = tmp_beside(dst)
    try:
        write(tmp)
        os.replace(tmp, dst)
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
