"""The prompt file of `moeplace profile`: JSON lines or plain text.

- JSON lines (chosen when the file ends in `.jsonl`/`.json`, or its first non-blank line starts
  with `{`): one object per line, `{"prompt": str, "label": str (optional)}`; no other fields.
- Plain text: one prompt per line; no labels.

Blank lines are skipped in both. The order of the file is the request order (request id 0 is the
first prompt). Every error names the file and the 1-based line. Pure Python: no vLLM here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator

from vllm_moeplace.errors import MoeplaceError


class PromptFileError(MoeplaceError):
    """A prompt file is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    label: str | None = None


class _JsonRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    label: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    first = next((ln for ln in lines if ln.strip()), "")
    return first.lstrip().startswith("{")


def parse_prompts(text: str, src: str = "<prompts>", jsonl: bool | None = None) -> list[PromptRecord]:
    """Parse prompt-file text (see the module docstring); `jsonl=None` detects the format."""
    # Only "\n" ends a line (str.splitlines would also split on U+2028 etc., which JSON strings
    # may hold raw).
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
    if jsonl is None:
        jsonl = _is_jsonl(Path(src), lines)
    out: list[PromptRecord] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            out.append(PromptRecord(prompt=line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{src}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{src}:{n}: expected a JSON object with 'prompt', got {type(obj).__name__}")
        try:
            rec = _JsonRecord.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "<record>"
            value = obj.get(field, None) if isinstance(field, str) else None
            shown = "" if err["type"] == "missing" else f", got {value!r}"[:120]
            raise PromptFileError(f"{src}:{n}: field '{field}': {err['msg']}{shown}") from None
        out.append(PromptRecord(prompt=rec.prompt, label=rec.label))
    if not out:
        raise PromptFileError(f"{src}: no prompts (the file is empty or blank)")
    return out


def read_prompts(path: str | os.PathLike) -> list[PromptRecord]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"{p}: no such prompt file") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"{p}: cannot read ({e.strerror})") from None
    return parse_prompts(text, str(p))


def write_prompts_jsonl(path: str | os.PathLike, records: list[PromptRecord] | list[dict]) -> None:
    """Write records as JSON lines (used for the embedded default prompt set)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            d = r if isinstance(r, dict) else {"prompt": r.prompt, **({"label": r.label} if r.label is not None else {})}
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
