"""Atomic file and directory writes: outputs appear complete or not at all (SPEC.md)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlssp_jax.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary keeps ``path``'s suffixes (so ``.nii.gz`` or ``.npz`` writers see the
    right extension). On an exception the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it onto ``path`` on success.

    An existing ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is an ordinary directory
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


SAFE_NAME_MAX = 128
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def safe_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe file name (SPEC.md's subject_id rule), or None if it is.

    Safe: letters, digits, ``-``, ``_``, ``.``; not starting with ``.``; 1..128 characters.
    """
    if not name:
        return "is empty"
    if len(name) > SAFE_NAME_MAX:
        return f"is {len(name)} characters long (at most {SAFE_NAME_MAX})"
    if name.startswith("."):
        return "starts with '.'"
    if not (_SAFE_NAME.fullmatch(name) and name.isascii()):
        return "may hold only letters, digits, '-', '_' and '.'"
    return None


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path``, after checking that it lies inside ``folder`` (symlinks and ``..`` resolved).

    Every file a command writes from a name it did not choose (a subject id, a scan's name)
    goes through this. Raises InputError naming the path otherwise.
    """
    root, target = Path(folder).resolve(), Path(path).resolve()
    if target == root or root not in target.parents:
        raise InputError(f"{path}: would be written outside the output folder {folder}")
    return Path(path)


@contextlib.contextmanager
def staged_outputs(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside ``out_dir``; move its files into ``out_dir`` on success.

    A command writes all of one run's files into the staging folder; only when the block
    succeeds are they renamed into ``out_dir`` (each rename atomic, replacing an older file of
    the same name). On an exception the staging folder is removed, files already in
    ``out_dir`` (e.g. cached results) are untouched, and ``out_dir`` itself is removed if this
    call created it and it is left empty.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, inside(out_dir, out_dir / item.name))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    stage.rmdir()
