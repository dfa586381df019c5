"""Reading JSON input files (plans, topologies, simulator parameters) with one clear error."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vllm_moeplace.errors import MoeplaceError


def read_json(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> Any:
    """Parsed JSON of `path`; an unreadable or malformed file raises `error` naming the file
    (and, for bad JSON, the line and column)."""
    return parse_json_bytes(read_bytes(path, what, error), str(path), what, error)


def read_bytes(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None


def parse_json_bytes(data: bytes, src: str, what: str, error: type[MoeplaceError]) -> Any:
    """JSON of exactly these bytes (callers that hash a file parse the bytes they hashed)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise error(f"{src}: {what} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{src}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{src}: {what}: JSON nested too deeply") from None


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
