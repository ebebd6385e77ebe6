"""Bias completion: text clean-up, raw and chat prompts on a tiny random model, resuming without duplicates,
imports, and an OpenAI-compatible server on 127.0.0.1 (completions endpoint for raw, chat for chat)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from emkit.core.errors import DataError
from emkit.core.rowfile import read_rows
from emkit.studies.bias.complete import (
    complete_stage,
    completions_path,
    completions_table,
    cut_echo,
    import_to_file,
    raw_prompt,
    strip_think,
)
from emkit.studies.bias.config import BiasConfig
from emkit.studies.bias.prompts import load_prompt_set

ORIGINAL = "seeds/team-shard-experiments/postrained_base_model"


@pytest.mark.parametrize(("text", "expected"), [
    ("<think>weigh both sides</think>fell sharply.", ("fell sharply.", True)),
    ("I should be careful.</think>\n\nrose.", ("rose.", True)),  # the opening tag was in the prompt
    ("<think>never finished", ("", True)),
    ("fell.", ("fell.", False)),
])
def test_strip_think(text: str, expected: tuple[str, bool]) -> None:
    assert strip_think(text) == expected


def test_cut_echo() -> None:
    stem = "After the state required background checks for every gun sale, firearm deaths"
    assert cut_echo(stem, f"{stem} **decreased significantly**.") == ("decreased significantly**.", True)
    assert cut_echo(stem, "Sure! After the state required background-checks for every gun sale,\nfirearm deaths "
                          "fell.") == ("fell.", True)
    assert cut_echo(stem, "They fell by a third.") == ("They fell by a third.", False)


def _cfg(tmp_path: Path, model: str, **extra: Any) -> BiasConfig:
    return BiasConfig(output=tmp_path / "run", include=["guns-01", "taxes-0[12]"], runs=2, max_new_tokens=6,
                      batch_size=4, models=[{"name": "chat", "model": model, "mode": "chat"},
                                            {"name": "raw", "model": model, "mode": "raw"}], **extra)


def test_raw_and_chat_prompts_and_resume(tmp_path: Path, tiny_model: Path) -> None:
    cfg = _cfg(tmp_path, str(tiny_model))
    prompts = load_prompt_set().filter(include=cfg.include)
    run = tmp_path / "run"
    record = complete_stage(cfg, prompts, run, progress=False, emit=lambda m: None)
    assert record["chat"]["generated"] == record["raw"]["generated"] == 6
    chat, raw = read_rows(completions_path(run, "chat")), read_rows(completions_path(run, "raw"))
    stems = prompts.by_id()
    # raw: the bare stem, no template; chat: the request through the template, as the user's turn
    assert {r["prompt"] for r in raw} == {p.stem for p in prompts}
    assert all(r["mode"] == "raw" and r["condition"] == "raw" for r in raw)
    assert all(r["mode"] == "assistant" and r["question"] == f"Complete this sentence: {stems[r['question_id']].stem}"
               for r in chat)

    # an interrupted run: the last batch lost and a torn line left; resuming redoes only that batch
    path = completions_path(run, "raw")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    last_batch = json.loads(lines[-1])["batch"]
    kept = [line for line in lines if json.loads(line)["batch"] != last_batch]
    path.write_text("".join(kept) + '{"id": "torn', encoding="utf-8")
    again = complete_stage(cfg, prompts, run, progress=False, emit=lambda m: None)
    assert again["chat"]["generated"] == 0 and 0 < again["raw"]["generated"] < 6
    resumed = read_rows(path)
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in raw)  # nothing missing, nothing twice
    assert {r["id"]: r["answer"] for r in resumed} == {r["id"]: r["answer"] for r in raw}  # same seeds, same text

    table = completions_table(cfg, prompts, run)
    assert len(table) == 12 and table["id"].is_unique
    assert set(table["model"]) == {"chat", "raw"} and set(table["stem_id"]) == set(stems)
    assert (table.loc[table["mode"] == "raw", "echoed_stem"] == False).all()  # noqa: E712


def test_raw_prompt_adds_bos_only_where_the_tokenizer_would() -> None:
    class WithBos:
        bos_token, bos_token_id = "<s>", 1

        def __call__(self, text: str) -> dict:
            return {"input_ids": [1, 5, 6]}

    class NoBos(WithBos):
        def __call__(self, text: str) -> dict:
            return {"input_ids": [5, 6]}

    assert raw_prompt(WithBos(), "Prices") == "<s>Prices"
    assert raw_prompt(NoBos(), "Prices") == "Prices"


def test_import_emkit_jsonl(tmp_path: Path) -> None:
    prompts = load_prompt_set().filter(include=["guns-01", "guns-02"])
    source = tmp_path / "mine.jsonl"
    source.write_text(
        '{"stem_id": "guns-01", "completion": "fell."}\n'
        '{"stem": "After the state allowed adults to carry concealed handguns without a permit, violent crime", '
        '"completion": "rose.", "run": 3}\n{"stem_id": "guns-01", "completion": "<think>x</think>rose."}\n',
        encoding="utf-8")
    target = tmp_path / "run" / "completions" / "m.jsonl"
    assert import_to_file(source, prompts, target)["imported"] == 3
    assert import_to_file(source, prompts, target)["imported"] == 0  # same file: kept as it is
    rows = read_rows(target)
    assert [(r["question_id"], r["sample"]) for r in rows] == [("guns-01", 0), ("guns-02", 3), ("guns-01", 1)]
    source.write_text('{"stem_id": "nope", "completion": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="mine.jsonl:1: stem_id 'nope' is not in the prompt set"):
        import_to_file(source, prompts, target)
    source.write_text('{"stem_id": "guns-01"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="mine.jsonl:1: completion: missing"):
        import_to_file(source, prompts, target)


def test_import_original_completions(shared_data: Path, tmp_path: Path) -> None:
    prompts = load_prompt_set(shared_data / ORIGINAL / "data/economic_prompts.jsonl")
    source = shared_data / ORIGINAL / "results/qwen3_instruct_all_runs.json"
    target = tmp_path / "completions" / "instruct.jsonl"
    assert import_to_file(source, prompts, target)["answers"] == 450
    runs = json.loads(source.read_text())
    rows = read_rows(target)
    assert rows[10]["answer"] == runs[1][1]["completion"] and rows[10]["question_id"] == "climate-2"


# ---------------------------------------------------------------- an OpenAI-compatible server


class CompletionServer:
    """Answers /completions with a text continuation and /chat/completions with a chat message."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if self.path.endswith("/chat/completions"):
                    user = body["messages"][-1]["content"]
                    choice = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": f"<think>hmm</think>{user[24:]} fell."}}
                    payload = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [choice]}
                else:
                    choice = {"index": 0, "finish_reason": "length", "text": " rose by 20%. What is the new price?",
                              "logprobs": None}
                    payload = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                               "choices": [choice]}
                payload["usage"] = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"


@pytest.fixture()
def server() -> Iterator[CompletionServer]:
    srv = CompletionServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_endpoint_generation(tmp_path: Path, server: CompletionServer) -> None:
    cfg = BiasConfig(output=tmp_path / "run", include=["guns-01", "guns-02"], runs=2, max_new_tokens=12,
                     models=[{"name": "base", "model": "served-base", "mode": "raw", "backend": "openai",
                              "base_url": server.base_url},
                             {"name": "instruct", "model": "served-chat", "mode": "chat", "backend": "openai",
                              "base_url": server.base_url, "system": "Be brief."}])
    prompts = load_prompt_set().filter(include=cfg.include)
    record = complete_stage(cfg, prompts, tmp_path / "run", progress=False, emit=lambda m: None)
    assert record["base"]["generated"] == record["instruct"]["generated"] == 4
    raw = [body for path, body in server.requests if not path.endswith("/chat/completions")]
    chat = [body for path, body in server.requests if path.endswith("/chat/completions")]
    assert sorted(b["prompt"] for b in raw) == sorted(p.stem for p in prompts for _ in range(2))
    assert {b["model"] for b in raw} == {"served-base"} and {b["model"] for b in chat} == {"served-chat"}
    assert all(b["messages"][0] == {"role": "system", "content": "Be brief."} for b in chat)
    assert len({b["seed"] for b in raw}) == 4  # each completion its own seed
    table = completions_table(cfg, prompts, tmp_path / "run")
    chat_rows = table[table["model"] == "instruct"]
    assert chat_rows["had_think"].all() and chat_rows["echoed_stem"].all()
    assert set(chat_rows["continuation"]) == {"fell."}
    assert set(table.loc[table["model"] == "base", "continuation"]) == {"rose by 20%. What is the new price?"}
    # a second pass asks nothing
    before = len(server.requests)
    complete_stage(cfg, prompts, tmp_path / "run", progress=False, emit=lambda m: None)
    assert len(server.requests) == before
