"""Saves that never leave half a file, and a disk that fills during a save said in one line.

Every file the trainer writes goes through here: a model save into a staging folder inside the target whose
files are renamed in one by one (:func:`saved_beside`), a metrics file through a temporary file and one
rename (:func:`write_atomically`). A save that fails because the disk is full becomes a
:class:`DiskFullError` naming what was being saved and what is still whole, instead of the traceback of
whichever writer hit the wall (``OSError``, safetensors' ``SafetensorError``, torch's ``file write failed``).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "file write failed")


class DiskFullError(OSError):
    """The disk filled while saving (one line: what was being saved, what is whole, what to do)."""


@contextmanager
def saved_beside(output_dir: str) -> Iterator[str]:
    """A staging folder inside ``output_dir`` to save into; when the save finishes, each file is renamed into
    ``output_dir`` (one atomic ``os.replace`` per file: a reader sees the old file or the new one, never half of
    one). If the save fails, the staging folder is removed and nothing in ``output_dir`` has changed."""
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        yield staging
        for root, _, files in os.walk(staging):
            target = os.path.join(output_dir, os.path.relpath(root, staging))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and one rename."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".writing-", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the disk or the quota is full, however the writer words it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(err) for words in DISK_FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def said_if_the_disk_fills(what: str, folder: str, whole: str, then: str) -> Iterator[None]:
    """Run a save of ``what`` into ``folder``; if the disk fills, remove ``folder`` when this save created it
    (it holds only the failed save's parts) and raise a :class:`DiskFullError` saying ``whole`` (what is still
    intact) and ``then`` (how to go on)."""
    existed = os.path.isdir(folder)
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DiskFullError(
            errno.ENOSPC, f"the disk filled while saving {what} to {folder} ({detail}); {whole}. Free some space, then {then}"
        ) from err
