"""Chat JSONL: reading plain and gzipped files, and one clear error per kind of malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import run_cli, write_chat_jsonl

from emkit.core.errors import DataError
from emkit.data.chat import content_sha256, read_chat_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_reads_plain_and_gz(tmp_path: Path) -> None:
    plain = write_chat_jsonl(tmp_path / "a.jsonl", n=5, system=True)
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert [c.messages for c in read_chat_jsonl(plain)] == [c.messages for c in read_chat_jsonl(gz)]
    assert content_sha256(plain) == content_sha256(gz)
    assert len(read_chat_jsonl(plain, limit=2)) == 2


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert [c.line for c in read_chat_jsonl(path)] == [2, 4]


BAD_LINES = [
    ('{"messages": [', r"invalid JSON at column"),
    ('[1, 2]', r"line is a JSON list"),
    ('{"msgs": []}', r"messages: missing"),
    ('{"messages": []}', r"messages: must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\]\.role: unknown role 'bot'"),
    ('{"messages": [{"content": "x"}]}', r"messages\[0\]\.role: missing"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
     r"messages\[1\]\.content: empty"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"messages\[0\]\.content: must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"messages: no assistant turn to train on"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}',
     r"messages\[1\]\.role: a system message may only come first"),
]


@pytest.mark.parametrize("line,pattern", BAD_LINES)
def test_malformed_line_names_file_line_and_field(tmp_path: Path, line: str, pattern: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {pattern}.*\(and 1 more bad lines\)"):
        read_chat_jsonl(path)


def test_missing_empty_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_chat_jsonl(tmp_path / "empty.jsonl")
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(((json.dumps(GOOD) + "\n") * 200).encode())[:-30])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_chat_jsonl(gz)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(DataError, match="latin.jsonl:1: not UTF-8"):
        read_chat_jsonl(latin)


def test_cli_check(tmp_path: Path) -> None:
    good = write_chat_jsonl(tmp_path / "good.jsonl", n=3)
    result = run_cli("data", "check", str(good))
    assert result.returncode == 0 and "3 conversations" in result.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 1}\n')
    result = run_cli("data", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "bad.jsonl:1: messages" in result.stderr
