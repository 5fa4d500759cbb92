"""Write a directory so that a crash never leaves it half-written and never loses the old one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def check_writable(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True "
                              "(--overwrite on the command line) to replace it")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary sibling of ``final``; on success it replaces ``final`` by rename.

    An existing ``final`` is removed only after the new directory took its name; on any error the
    temporary directory is deleted and ``final`` is left exactly as it was.
    """
    final = Path(final).absolute()
    check_writable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.writing-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, final: Path) -> None:
    if not final.exists():
        os.rename(new, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
