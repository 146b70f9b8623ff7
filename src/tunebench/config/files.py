"""Paths and file reads at the input boundary: a path is checked before the filesystem sees it, and a file is read
only when it is a regular file under a size limit, so no input can hang a read (a FIFO, ``/dev/zero``), exhaust
memory or surface an ``OSError`` instead of an error that names the field.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigError, TunebenchError

PATH_MAX = 4096  # bytes in a whole path (Linux PATH_MAX)
NAME_MAX = 255  # bytes in one path component (NAME_MAX of the common filesystems)
MiB = 1 << 20
STUDY_MAX_BYTES = 4 * MiB
TEMPLATE_MAX_BYTES = 1 * MiB


def clip(value: object, limit: int = 120) -> str:
    """``repr``-like text of ``value`` cut to ``limit`` characters: what an error message quotes."""
    plain = isinstance(value, str) and (value.isprintable() or not any(
        not c.isprintable() and c not in "\n\t" for c in value[: limit * 4]))
    text = value if plain else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else f"{text[: limit - 20]}… ({len(text):,} characters)"


def path_problem(value: object) -> str | None:
    """Why ``value`` cannot be a path the filesystem accepts (None when it can)."""
    if not isinstance(value, (str, os.PathLike)):
        return f"expected a file path, got {type(value).__name__} {clip(value, 60)}"
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        return "the path is empty; give a file path"
    if "\x00" in text:
        return f"the path {clip(text, 80)} contains a NUL character"
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        return f"the path {clip(text, 80)} cannot be encoded for this filesystem"
    if len(encoded) > PATH_MAX:
        return f"the path is {len(encoded):,} bytes long; the limit is {PATH_MAX:,} ({clip(text, 60)})"
    long = next((p for p in encoded.split(b"/") if len(p) > NAME_MAX), None)
    if long is not None:
        return f"a file or folder name in {clip(text, 60)} is {len(long)} bytes long; the limit is {NAME_MAX}"
    return None


def check_path(value: object, where: str, error: type[TunebenchError] = ConfigError) -> Path:
    """``value`` as a ``Path`` after the checks the filesystem would otherwise fail with an ``OSError``;
    ``where`` names the field (or the file and line) in the error."""
    problem = path_problem(value)
    if problem is not None:
        raise error(f"{where}: {problem}")
    return Path(os.fspath(value))  # type: ignore[arg-type]


def path_field(value: object) -> object:
    """A pydantic validator body: ``value`` unchanged when it is a usable path (None passes), else ValueError."""
    if value is None:
        return value
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def read_limited(path: Path, where: str, max_bytes: int, error: type[TunebenchError] = ConfigError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is an error naming ``where``.

    The file's type is checked with ``stat`` before it is opened (opening a FIFO would block) and the read
    stops at the limit, so a file that grows while it is read cannot exceed it either."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{where}: {clip(str(path), 200)}: file not found") from None
    except OSError as exc:
        raise error(f"{where}: {clip(str(path), 200)}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{where}: {clip(str(path), 200)} is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where}: {clip(str(path), 200)} is not a regular file (a device, FIFO or socket); "
                    "give a file")
    if st.st_size > max_bytes:
        raise error(f"{where}: {clip(str(path), 200)} is {st.st_size:,} bytes; the limit is {max_bytes:,}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{where}: {clip(str(path), 200)}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise error(f"{where}: {clip(str(path), 200)} is over the limit of {max_bytes:,} bytes")
    return data


def read_text_limited(path: Path, where: str, max_bytes: int, error: type[TunebenchError] = ConfigError) -> str:
    """:func:`read_limited` decoded as UTF-8; a decoding error names the line."""
    data = read_limited(path, where, max_bytes, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{where}: {clip(str(path), 200)} line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                    "save the file as UTF-8") from None
