"""Writing files and folders atomically: a reader sees the old version or the new one, never half.

Used for the embedded model's cache (``course.models``), the shipped adapters
(``course.adapters``) and the generated notebooks (``course.notebooks``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target, *, keep_others: bool = False):
    """Yield an empty folder beside ``target``; when the block succeeds it replaces ``target``.

    With ``keep_others``, files of an existing ``target`` that the block did not write
    are carried over (an adapter folder's README, say). If the block raises, ``target``
    is left as it was and the temporary folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if keep_others and target.is_dir():
            for item in target.iterdir():
                if not (tmp / item.name).exists():
                    copy = shutil.copytree if item.is_dir() else shutil.copy2
                    copy(item, tmp / item.name)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is for everyone to read
        for item in tmp.rglob("*"):  # some writers (safetensors) make files 0600: the cache is shared
            item.chmod(0o755 if item.is_dir() else 0o644)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:  # put the old one back
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
