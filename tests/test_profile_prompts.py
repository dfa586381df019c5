"""The prompt file of `moeplace profile`: JSON lines or plain text, errors with file:line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.profiling.prompts import PromptFileError, PromptRecord, parse_prompts, read_prompts, write_prompts_jsonl


def test_jsonl_with_and_without_labels(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a b", "label": "code"}\n\n{"prompt": "c"}\n')
    assert read_prompts(p) == [PromptRecord("a b", "code"), PromptRecord("c", None)]


def test_plain_text_one_prompt_per_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("first prompt\n\n  second {not json}\n")
    assert read_prompts(p) == [PromptRecord("first prompt"), PromptRecord("  second {not json}")]


def test_format_detected_from_first_line_without_suffix(tmp_path):
    p = tmp_path / "prompts"
    p.write_text('{"prompt": "x", "label": "l"}\n')
    assert read_prompts(p) == [PromptRecord("x", "l")]


@pytest.mark.parametrize(
    "line, where",
    [
        ('{"prompt": "ok"}\n{"prompt": 3}', ":2: field 'prompt'"),
        ('{"prompt": "ok"}\n{"label": "x"}', ":2: field 'prompt': Field required"),
        ('{"prompt": "ok", "labl": "x"}', ":1: field 'labl'"),
        ('{"prompt": "ok"}\n{"prompt": "a"', ":2: not valid JSON"),
        ('{"prompt": "ok"}\n["a"]', ":2: expected a JSON object"),
        ('{"prompt": "   "}', ":1: field 'prompt': Value error, must be a non-empty string"),
        ('{"prompt": "a", "label": 5}', ":1: field 'label'"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, line, where):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(PromptFileError) as e:
        read_prompts(p)
    assert str(e.value).startswith(str(p)) and where in str(e.value), str(e.value)
    assert isinstance(e.value, MoeplaceError)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(PromptFileError, match="no such prompt file"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompts(tmp_path / "b.txt")


records = st.lists(
    st.builds(
        PromptRecord,
        prompt=st.text(min_size=1).filter(lambda s: s.strip()),
        label=st.none() | st.text(max_size=8),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=50, deadline=None)
@given(records)
def test_jsonl_round_trip(tmp_path_factory, recs):
    p = tmp_path_factory.mktemp("rt") / "p.jsonl"
    write_prompts_jsonl(p, recs)
    assert read_prompts(p) == recs


def test_parse_prompts_keeps_file_order():
    text = "\n".join(json.dumps({"prompt": f"p{i}", "label": str(i % 2)}) for i in range(5))
    assert [r.prompt for r in parse_prompts(text, "x.jsonl")] == [f"p{i}" for i in range(5)]
