"""Reading JSON input files (plans, topologies, simulator parameters) with one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vllm_moeplace.errors import MoeplaceError


def read_json(path: str | os.PathLike, what: str, error: type[MoeplaceError]) -> Any:
    """Parsed JSON of `path`; an unreadable or malformed file raises `error` naming the file
    (and, for bad JSON, the line and column)."""
    src = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise error(f"{src}: cannot read {what}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{src}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
