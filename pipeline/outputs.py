"""Output paths checked before any work: the one rule of every command and of the inventory writer.

A file is refused when its name has the wrong suffix, it is a folder, it exists and may not be
replaced, or its folder cannot take it; every refusal is one :class:`OutputError` line.
"""

from __future__ import annotations

import os
from pathlib import Path

from rtsmap.pipeline.errors import OutputError


def nearest_existing(path: str | Path) -> Path:
    """``path`` itself, or its closest ancestor that exists (absolute)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder: str | Path, what: str) -> None:
    """Refuse a folder that is neither a writable directory nor creatable in one.

    Raises
    ------
    OutputError
    """
    folder = Path(folder)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {folder} cannot be written: {existing} is not writable")


def check_output_file(path: str | Path, *, suffix: str, overwrite: bool, what: str = "--out",
                      create_folder: bool = False) -> None:
    """Refuse an output file before anything is written.

    Parameters
    ----------
    path
        The file to write.
    suffix
        Its required suffix, lower case with the dot (``.gpkg``, ``.onnx``).
    overwrite
        Whether an existing file may be replaced.
    what
        How the message names the path (the flag, or ``inventory``).
    create_folder
        The writer creates missing folders (then a folder that could be created is enough);
        else the folder must exist.

    Raises
    ------
    OutputError
        Wrong suffix, a folder, an existing file without ``overwrite``, or a folder that does
        not exist (and will not be created) or cannot be written.
    """
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise OutputError(f"{what} {path}: the file name must end in {suffix}")
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a {suffix} file path")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another path")
    if create_folder:
        check_writable_dir(path.parent, "the output folder")
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: the folder {folder} does not exist (or is not a folder); create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: the folder {folder} is not writable")
