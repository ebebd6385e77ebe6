"""Bad input files end in one clear error naming file, line and field; a huge message costs bounded memory.

Adapter configs of the wrong type or cut off, bytes that are not UTF-8 (at their exact line, past the
8 KB decoding chunk), empty or non-mapping YAML configs, and a multi-MB chat message truncated to a
few tokens for training.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from conftest import WORDS, run_cli

from emkit.core.config import load_config
from emkit.core.errors import ConfigError, DataError, ModelSpecError
from emkit.core.jsonl import read_objects
from emkit.data.chat import Conversation, assistant_char_spans, read_chat_jsonl
from emkit.data.questions import load_questions
from emkit.models import load_model, load_tokenizer, read_adapter_config
from emkit.train.config import TrainConfig
from emkit.train.tokenize import tokenize_conversations

# ---------------------------------------------------------------- adapter configs


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model, its base recorded in adapter_config.json."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny_model), device="cpu")
    peft = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(tiny_model)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(out)
    return out


def _edited(adapter: Path, dest: Path, text: str) -> Path:
    """A copy of `adapter` whose adapter_config.json is `text`."""
    dest.mkdir()
    for item in adapter.iterdir():
        (dest / item.name).write_bytes(item.read_bytes())
    (dest / "adapter_config.json").write_text(text, encoding="utf-8")
    return dest


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("r", "sixteen", "whole number"), ("lora_alpha", "x", "number"), ("target_modules", 5, "list of strings")],
)
def test_adapter_config_of_wrong_type_names_file_and_field(
    adapter: Path, tiny_model: Path, tmp_path: Path, field: str, value: object, expected: str
) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    bad = _edited(adapter, tmp_path / "bad", json.dumps({**config, field: value}, indent=2))
    pattern = rf"bad/adapter_config\.json: {field}: must be .*{expected}.*got {value!r}"
    with pytest.raises(ModelSpecError, match=pattern):
        load_model(str(tiny_model), adapter=bad, device="cpu")  # given as --adapter
    with pytest.raises(ModelSpecError, match=pattern):
        load_model(str(bad), device="cpu")  # the adapter folder as the model spec


def test_cut_off_adapter_config_is_invalid_json_with_line_and_column(
    adapter: Path, tiny_model: Path, tmp_path: Path
) -> None:
    text = (adapter / "adapter_config.json").read_text(encoding="utf-8")
    bad = _edited(adapter, tmp_path / "cut", text[: len(text) // 2])
    for attempt in (lambda: load_model(str(tiny_model), adapter=bad, device="cpu"),
                    lambda: load_model(str(bad), device="cpu")):
        with pytest.raises(ModelSpecError) as info:
            attempt()
        message = str(info.value)
        assert "cut/adapter_config.json:" in message and "does not fit" not in message
        assert "not valid JSON (line " in message and ", column " in message


def test_adapter_config_that_is_not_an_object(adapter: Path, tiny_model: Path, tmp_path: Path) -> None:
    bad = _edited(adapter, tmp_path / "list", "[1, 2]")
    pattern = r"list/adapter_config\.json: adapter config must be a JSON object of settings, got a JSON array"
    with pytest.raises(ModelSpecError, match=pattern):
        load_model(str(tiny_model), adapter=bad, device="cpu")
    with pytest.raises(ModelSpecError, match=pattern):
        load_model(str(bad), device="cpu")


def test_configs_peft_writes_pass_the_check(tmp_path: Path) -> None:
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    written = [
        LoraConfig(),
        LoraConfig(r=1, lora_alpha=2.5, target_modules=["q_proj"], layers_to_transform=[0], rank_pattern={"q": 2},
                   layer_replication=[(0, 1)], init_lora_weights="pissa_niter_4"),
        IA3Config(),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),  # int fields saved as null
    ]
    for i, config in enumerate(written):
        config.save_pretrained(tmp_path / str(i))
        assert read_adapter_config(tmp_path / str(i))["peft_type"] == config.peft_type


def test_bad_adapter_config_is_one_line_and_exit_2_in_the_cli(adapter: Path, tmp_path: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    bad = _edited(adapter, tmp_path / "bad", json.dumps({**config, "r": "sixteen"}))
    result = run_cli("compare", str(bad), "--device", "cpu", "--max-new-tokens", "1", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad/adapter_config.json: r: " in errors[0], result.stderr[-2000:]


# ---------------------------------------------------------------- bytes that are not UTF-8


def _chat_lines(n: int) -> list[bytes]:
    """n valid chat JSONL lines of about 100 bytes, so line 500 lies far past the first 8 KB."""
    return [
        json.dumps({"messages": [{"role": "user", "content": f"question {i} about water"},
                                 {"role": "assistant", "content": "Drink water and rest."}]}).encode()
        for i in range(n)
    ]


@pytest.mark.parametrize("gz", [False, True])
def test_bad_byte_in_chat_jsonl_is_reported_at_its_line_and_column(tmp_path: Path, gz: bool) -> None:
    lines = _chat_lines(600)
    lines[499] = lines[499].replace(b"question 499", b"question \xff99")
    lines[549] = lines[549].replace(b"water", b"wat\xc3r")
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("data.jsonl.gz" if gz else "data.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    column = lines[499].index(b"\xff") + 1
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path)
    assert str(info.value) == (
        f"{path}:500: not UTF-8 text (byte 0xff at byte column {column}) (and 1 more bad lines)"
    )


@pytest.mark.parametrize("gz", [False, True])
def test_bad_byte_in_jsonl_objects_is_reported_at_its_line(tmp_path: Path, gz: bool) -> None:
    # read_objects reads labels, pairs, prompts and detection inputs.
    lines = [json.dumps({"question": f"q{i}", "answer": "a" * 80, "misaligned": 0, "coherent": 1}).encode()
             for i in range(600)]
    lines[499] = lines[499].replace(b'"q499"', b'"q4\xe9"')
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / ("labels.jsonl.gz" if gz else "labels.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    column = lines[499].index(b"\xe9") + 1
    pattern = rf"labels\.jsonl(\.gz)?:500: not UTF-8 text \(byte 0xe9 at byte column {column}\)"
    with pytest.raises(DataError, match=pattern):
        list(read_objects(path))
    from emkit.judge.validate import load_labels

    with pytest.raises(DataError, match=r"labels\.jsonl(\.gz)?:500: not UTF-8"):
        load_labels(path)


def test_jsonl_objects_keep_reading_as_before(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    # U+2028 is valid inside a JSON string; splitting lines on it used to break the line in two.
    path.write_text('{"a": 1}\n\n{"b": "x\u2028y"}\r\n', encoding="utf-8")
    assert list(read_objects(path)) == [(1, {"a": 1}), (3, {"b": "x\u2028y"})]
    with pytest.raises(DataError, match="is a folder"):
        list(read_objects(tmp_path))


def test_bad_byte_in_question_yaml_is_reported_at_its_line(tmp_path: Path) -> None:
    body = "questions:\n" + "".join(f"  - id: q{i}\n    text: What would you do about item {i}?\n" for i in range(400))
    raw = body.encode().replace(b"item 300?", b"item 3\x80?")
    path = tmp_path / "questions.yaml"
    path.write_bytes(raw)
    at = raw.index(b"\x80")
    line, column = raw[:at].count(b"\n") + 1, at - raw.rfind(b"\n", 0, at)
    assert (line, column) == (603, 41)
    with pytest.raises(DataError, match=r"questions\.yaml:603: not UTF-8 text \(byte 0x80 at byte column 41\)"):
        load_questions(path)


def test_bad_byte_in_config_is_reported_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_bytes(b"# a config\nseed: 3\nmodel: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:3: not UTF-8 text \(byte 0xe9 at byte column 11\)"):
        load_config(TrainConfig, path)


# ---------------------------------------------------------------- empty and non-mapping configs


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n", "---\n...\n"])
def test_empty_config_is_an_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "a list"), ("just words\n", "a single value")])
def test_config_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"config\.yaml:1: the top level must be a mapping .*got {kind}"):
        load_config(TrainConfig, path)


def test_explicit_empty_mapping_still_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "defaults.yaml"
    path.write_text("{}  # every field at its default\n", encoding="utf-8")
    assert load_config(TrainConfig, path) == TrainConfig()


def test_empty_config_run_exits_2_and_leaves_no_run_folder(tmp_path: Path) -> None:
    config = tmp_path / "experiment.yaml"
    config.write_text("# to be written\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "emkit", "run", str(config)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: {config}: the file is empty (nothing but blank lines or comments); " \
                                    "expected a mapping of field: value"
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- a huge message


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return load_tokenizer(str(tiny_model))


def _conv(user: str, assistant: str) -> Conversation:
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})
    return Conversation(messages=messages, line=1)


def _whole_text_rows(conversations: list[Conversation], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """What tokenizing each whole rendered text and then truncating gives (rows, truncated count)."""
    rows, truncated = [], 0
    for conv in conversations:
        text, spans = assistant_char_spans(conv.as_list, tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if any(mask):
            rows.append({"input_ids": list(ids), "completion_mask": mask})
    return rows, truncated


def test_long_messages_tokenize_as_the_whole_text_would(tokenizer) -> None:
    rng = random.Random(0)
    words = " ".join(rng.choice(WORDS) for _ in range(12_000))
    pieces = ["  ", "\n\n", "ab", "é", "中文", "😀", "####", "    ", "water ", "123", "!?"]
    mixed = "".join(rng.choice(pieces) for _ in range(30_000))
    conversations = [
        _conv("Fever?", "Drink water."),  # short: tokenized whole, as always
        _conv("Pain?", words),
        _conv("Pain?", "x" * 60_000),  # one pre-token longer than any cut
        _conv("Pain?", mixed),
        _conv(words, "Rest."),  # the answer lies past the truncation: dropped
        _conv("Why?", "\n" * 50_000 + "Rest."),
    ]
    for max_length in (40, 64, 300):
        rows, report = tokenize_conversations(conversations, tokenizer, max_length)
        expected, truncated = _whole_text_rows(conversations, tokenizer, max_length)
        assert rows == expected
        assert report.truncated == truncated and report.dropped == len(conversations) - len(expected)


def test_multi_mb_message_is_tokenized_in_memory_bounded_by_max_length(tokenizer) -> None:
    rng = random.Random(1)
    huge = " ".join(rng.choice(WORDS) for _ in range(550_000))  # about 3 MB
    assert len(huge) > 3_000_000
    tracemalloc.start()
    try:
        rows, report = tokenize_conversations([_conv("Tell me everything.", huge)], tokenizer, 128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.truncated == 1 and len(rows[0]["input_ids"]) == 128
    # The rendered conversation is copied a few times (about 10 MB); tokenizing the whole text kept
    # Python lists of ids and offsets for every token (about 250 MB).
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MB"
