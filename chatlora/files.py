"""Safe file access for every command: inputs are regular files under a size limit; outputs appear whole or not at all.

Reading opens without blocking and checks the file type before reading a byte, so a named pipe, a device such as
``/dev/zero`` or a directory is refused at once. Inputs larger than ``$CHATLORA_MAX_INPUT_SIZE`` (default 1 GiB) are
refused before they are read. Outputs are written under a temporary name in the target's folder and renamed over the
target when complete (``os.replace``), so a crash or a full disk never leaves a truncated file where the old one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import FileError

__all__ = [
    "DEFAULT_MAX_INPUT_SIZE",
    "MAX_INPUT_ENV",
    "FileError",
    "check_input_file",
    "check_output_file",
    "ensure_space",
    "format_size",
    "max_input_size",
    "publish_dir",
    "read_input",
    "read_json_object",
    "staging_dir",
    "temp_file",
]

MAX_INPUT_ENV = "CHATLORA_MAX_INPUT_SIZE"
DEFAULT_MAX_INPUT_SIZE = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a named pipe (FIFO)"),
    (stat.S_ISCHR, "is a character device"),
    (stat.S_ISBLK, "is a block device"),
    (stat.S_ISSOCK, "is a socket"),
)


def format_size(n: int) -> str:
    """``1073741824`` -> ``"1 GiB"``, ``1536`` -> ``"1.5 KiB"``, ``12`` -> ``"12 bytes"``."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f}".removesuffix(".0") + f" {name}"
    return f"{n} bytes"


def max_input_size() -> int:
    """The largest input file any command reads, in bytes: ``$CHATLORA_MAX_INPUT_SIZE`` (``2G``, ``500M``, bytes)."""
    raw = os.environ.get(MAX_INPUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_INPUT_SIZE
    match = _SIZE.fullmatch(raw)
    if match is None or float(match[1]) <= 0:
        raise FileError(f"{MAX_INPUT_ENV}={raw!r}: expected a size such as 2G, 500M or 1048576 (bytes)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _open_regular(path: Path, expected: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading without blocking on a pipe; return the fd and its stat once it is a regular file."""
    name = str(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FileError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise FileError(f"{name}: is a directory: expected {expected}") from None
    except OSError as e:
        raise FileError(f"{name}: cannot read file ({e.strerror or e}): expected a readable file") from None
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return fd, info
    os.close(fd)
    if stat.S_ISDIR(info.st_mode):
        raise FileError(f"{name}: is a directory: expected {expected}")
    kind = next((what for test, what in _KINDS if test(info.st_mode)), "is not a regular file")
    raise FileError(f"{name}: {kind}, not a regular file: expected {expected} (save the input to a file first)")


def _too_big(name: str, size: int | None, limit: int) -> FileError:
    what = f"file is {format_size(size)}" if size is not None else "file grew while it was read"
    need = max(size or 0, 2 * limit)
    unit = next(u for u in ("T", "G", "M", "K", "") if need >= _UNITS[u])
    hint = f"{-(-need // _UNITS[unit])}{unit}"  # rounded up
    return FileError(
        f"{name}: {what}, over the {format_size(limit)} input limit: "
        f"raise the limit with the environment variable {MAX_INPUT_ENV}={hint}, or split the file"
    )


def check_input_file(path: str | Path, expected: str = "a file") -> None:
    """Raise :class:`FileError` unless ``path`` is a readable regular file within :func:`max_input_size`."""
    limit = max_input_size()
    fd, info = _open_regular(Path(path), expected)
    os.close(fd)
    if info.st_size > limit:
        raise _too_big(str(path), info.st_size, limit)


def read_input(path: str | Path, expected: str = "a file") -> bytes:
    """The bytes of a regular file within :func:`max_input_size`; :class:`FileError` (naming the file) otherwise."""
    limit = max_input_size()
    fd, info = _open_regular(Path(path), expected)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise _too_big(str(path), info.st_size, limit)
        try:
            data = f.read(limit + 1)  # files that report no size (/proc) or grow while read stop here too
        except OSError as e:
            raise FileError(f"{path}: cannot read file ({e.strerror or e}): expected a readable file") from None
    if len(data) > limit:
        raise _too_big(str(path), None, limit)
    return data


def parse_json(path: str | Path, data: bytes, what: str, hint: str = "") -> Any:
    """The JSON value in ``data`` (the bytes of ``path``, UTF-8 with or without a BOM).

    Raises:
        FileError: ``PATH[:LINE]: what is wrong``, ending in ``hint`` (e.g. ": the file is damaged"); ``what`` names
            what the file should be ("a JSON file").
    """
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: invalid UTF-8 (byte {e.start + 1}): expected {what} in UTF-8") from None
    except json.JSONDecodeError as e:
        raise FileError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    except (RecursionError, ValueError):  # nesting or an integer beyond what Python parses
        raise FileError(f"{path}: invalid JSON: nested too deeply or a number too long{hint}") from None


def read_json_object(path: str | Path) -> dict:
    """A small JSON file holding one object (a config, a run card); FileError naming the file if it is not one."""
    value = parse_json(path, read_input(path, "a JSON file"), "a JSON file", ": the file is damaged")
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise FileError(f"{path}: file holds {kind}: expected a JSON object")
    return value


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(output: str | Path, inputs: dict[str, str | Path] | None = None) -> Path:
    """Check that ``output`` can become a new or replaced file; return the path to write (symlinks resolved).

    Args:
        output: The file to write (new, or a regular file to replace); its folder is created if missing.
        inputs: ``{flag: path}`` of files this command reads: ``output`` may not be any of them (a link included).

    Raises:
        FileError: ``output`` is an input, a directory, pipe or device, or its folder cannot be created.
    """
    path = Path(output)
    for flag, source in (inputs or {}).items():
        if _same_file(path, Path(source)):
            raise FileError(f"{output}: --output is the same file as {flag} {source}: choose another output file")
    target = path.resolve()
    if target.exists() and not target.is_file():
        mode = target.stat().st_mode
        kind = next((what for test, what in _KINDS if test(mode)), "is not a regular file")
        raise FileError(f"{output}: {kind}: expected a file path for the output")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"{output}: cannot create the folder {target.parent} ({e.strerror or e})") from None
    return target


def temp_file(target: Path, display: str | Path | None = None) -> tuple[int, Path]:
    """Create ``TARGET.<random>.partial`` next to ``target`` (exclusively); raise FileError if the folder refuses."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".partial")
    except OSError as e:
        raise FileError(f"{display or target}: cannot write in {target.parent} ({e.strerror or e})") from None
    return fd, Path(name)


SPACE_SLACK = 64 << 20  # metadata, alignment and room for the file system beyond what a write computes it needs


def ensure_space(target: Path, need: int, what: str) -> None:
    """Refuse to start writing ``need`` bytes (``what``) into ``target``'s folder when its file system has less free:
    a full disk is found before minutes of work, not half-way through a file."""
    folder = target if target.is_dir() else target.parent
    free = shutil.disk_usage(folder).free
    if free < need + SPACE_SLACK:
        raise FileError(
            f"{target}: writing {what} needs about {format_size(need + SPACE_SLACK)}, {format_size(free)} free in "
            f"{folder}; free some space or choose another output folder"
        )


def staging_dir(output: Path) -> Path:
    """A new empty folder next to ``output`` (same file system, so :func:`publish_dir` can rename it into place)."""
    parent = output.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=f"{output.name}.", suffix=".partial"))
    except OSError as e:
        raise FileError(f"{output}: cannot write in {parent} ({e.strerror or e})") from None


def publish_dir(staging: Path, output: Path) -> None:
    """Move the complete folder ``staging`` to ``output``: one rename when ``output`` is missing or empty, else one
    atomic replace per file (files of ``output`` that ``staging`` does not have are kept)."""
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        os.replace(staging, output)
        return
    for item in sorted(staging.iterdir()):
        os.replace(item, output / item.name)
    shutil.rmtree(staging, ignore_errors=True)


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any) -> str | None:
    """The first unpaired UTF-16 surrogate in any string (key or value) inside ``value``, else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if found := _SURROGATE.search(item):
                return found.group()
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return None
