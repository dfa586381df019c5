"""Reading JSON input files (plans, topologies, simulator parameters) with one clear error."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vllm_moeplace.errors import MoeplaceError


# Input files are small (a plan for 256 experts x 61 layers x EP 64 is a few MB); anything far
# larger is not one of ours, and reading it whole would be the first allocation an attacker picks.
MAX_JSON_BYTES = 256 << 20
# Deep enough for every file we define (plans nest 4 levels); deeper input is refused before any
# recursive code (pydantic, our checks) walks it.
MAX_JSON_DEPTH = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def read_json(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> Any:
    """Parsed JSON of `path`; an unreadable or malformed file raises `error` naming the file
    (and, for bad JSON, the line and column; for a bad value, the field)."""
    return parse_json_bytes(read_bytes(path, what, error), str(path), what, error)


def read_bytes(path: str | os.PathLike, what: str, error: type[MoeplaceError], limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of an input file, refusing folders, missing files and files over `limit` bytes
    (checked before reading, so a huge or endless file (/dev/zero) never fills memory)."""
    p = Path(path)
    try:
        st = p.stat()
        if p.is_dir():
            raise error(f"{path}: {what} is a folder, expected a file")
        if st.st_size > limit:
            raise error(f"{path}: {what} is {st.st_size} bytes, more than the {limit} a {what} can be")
        with p.open("rb") as f:
            data = f.read(limit + 1)  # character devices report size 0: bound the read itself
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path}: {what} is more than {limit} bytes")
    return data


def parse_json_bytes(data: bytes, src: str, what: str, error: type[MoeplaceError]) -> Any:
    """JSON of exactly these bytes (callers that hash a file parse the bytes they hashed).

    Beyond the JSON grammar, refuses what Python's parser lets through but no input of ours
    holds: NaN / Infinity (also as overflowing literals like 1e999), integers outside 64 bits
    (numpy would wrap or overflow on them later) and nesting deeper than MAX_JSON_DEPTH."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{src}: {what} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{src}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{src}: {what}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise error(f"{src}: {what}: unreadable JSON value ({e})") from None
    bad = first_bad_value(obj)
    if bad is not None:
        field, why = bad
        raise error(f"{src}: field '{field}': {why}")
    return obj


def first_bad_value(obj: Any) -> tuple[str, str] | None:
    """(field path, reason) of the first value no input file may hold, or None. Iterative, so
    depth is checked without recursing."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return where or "(top level)", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                return where or "(top level)", f"value {str(value)[:24]}...: integer does not fit 64 bits"
        elif isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                return where or "(top level)", f"value {value}: numbers must be finite (no NaN / Infinity)"
        elif isinstance(value, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in reversed(list(enumerate(value))))
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` so a crash never leaves a half-written file at `path` (plans, exports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
