"""Writing files and folders atomically: a reader sees the old version or the new one, never half.

Used for the embedded model's cache (``course.models``), the shipped adapters
(``course.adapters``), adapter folders (``course.peft_format``), checkpoints
(``course.checkpoints``) and the generated notebooks (``course.notebooks``).

What is written gets the permissions an ordinary ``open`` or ``mkdir`` would give under the
process's umask (0644 files and 0755 folders under the usual 022), not the private 0600/0700
of temporary files, so a shared cache stays readable to everyone it is shared with. A process
killed half-way leaves hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders behind;
``remove_leftovers`` clears them at the next start (call it while holding the folder's lock).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open`` under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new folder gets from ``mkdir`` under the current umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _open_up(root: Path) -> None:
    """Give ``root`` and everything in it the ordinary modes (temporary files and folders are private)."""
    files, dirs = file_mode(), dir_mode()
    root.chmod(dirs)
    for folder, subdirs, names in os.walk(root):
        for name in subdirs:
            Path(folder, name).chmod(dirs)
        for name in names:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(files | (path.stat().st_mode & 0o111 & dirs))


def atomic_write(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_current_folder(path: Path) -> bool:
    """True for the working folder and the folders above it: those cannot be renamed away."""
    here, there = Path.cwd().resolve(), path.resolve()
    return there == here or there in here.parents


@contextmanager
def atomic_directory(target, *, keep_others: bool = False):
    """Yield an empty folder; when the block succeeds its contents become ``target``.

    Without ``keep_others`` the new folder replaces ``target`` as a whole (one rename).
    With ``keep_others`` and an existing ``target``, each file the block wrote replaces its
    namesake in ``target`` by a rename of its own, and everything else in ``target`` stays
    where it is (an adapter folder's README, a run's checkpoints, a lock file): this also
    works for the working folder (``"."``), which cannot be renamed. If the block raises,
    ``target`` is left as it was and the temporary folder is removed.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder; nothing was written. Name a folder.")
    merge = keep_others and target.is_dir()
    if not merge and target.is_dir() and _is_current_folder(target):
        raise ValueError(f"{target} is the working folder (or holds it), which cannot be replaced as a whole; "
                         "name another folder.")
    if merge:
        tmp = Path(tempfile.mkdtemp(dir=target, prefix=".tmp-"))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _open_up(tmp)
        if merge:
            for item in sorted(tmp.iterdir(), key=lambda p: p.is_file()):  # folders first, then files
                if item.is_dir():
                    _swap_into_place(item, target / item.name)
                else:
                    os.replace(item, target / item.name)
        else:
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


_LEFTOVER = re.compile(r"^\.(?:(?P<name>.+)\.)?(?:tmp|old)-[A-Za-z0-9_]+$")


def remove_leftovers(folder, name: str | None = None) -> list[Path]:
    """Remove what killed atomic writes left in ``folder``: hidden ``.<name>.tmp-*`` / ``.<name>.old-*``
    folders (all of them, or those of ``name`` only). Returns what was removed.

    Only call it while holding the lock that every writer of ``folder`` takes: a temporary folder
    of a write still in progress looks the same as a stale one.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        match = _LEFTOVER.match(item.name)
        if match and item.is_dir() and not item.is_symlink() and (name is None or match["name"] == name):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item)
    return removed
