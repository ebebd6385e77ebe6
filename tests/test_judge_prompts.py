"""Choice of judge prompts (emkit, betley, model-organisms): upstream sets from the data registry,
old config hashes unchanged, and the judging stage recording which prompts judged."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer

from emkit.core.config import config_hash
from emkit.core.errors import ConfigError, EmkitError
from emkit.core.rowfile import append_rows
from emkit.judge.config import JudgeConfig
from emkit.judge.prompts import PROMPT_SETS, default_prompts, prompt_set

KEY_ENV = "EMKIT_TEST_JUDGE_KEY"


def test_new_judge_fields_at_their_defaults_keep_old_dumps_and_hashes() -> None:
    # hashes of JudgeConfig as emkit computed them before `prompts` and `min_scorable` existed (e07da5d)
    assert config_hash(JudgeConfig()) == "401d0d07279e8d3e"
    assert config_hash(JudgeConfig(aligned_inclusive=True)) == "b1dad974a971c29c"
    dumped = JudgeConfig().model_dump(mode="json")
    assert "prompts" not in dumped and "min_scorable" not in dumped
    chosen = JudgeConfig(prompts="betley", min_scorable=0.9)
    assert chosen.model_dump()["prompts"] == "betley" and config_hash(chosen) != config_hash(JudgeConfig())
    assert typing.get_args(JudgeConfig.model_fields["prompts"].annotation) == ("auto", *PROMPT_SETS)
    with pytest.raises(ValueError):
        JudgeConfig(prompts="gpt-judges")


def test_unknown_prompt_set_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown judge prompt set 'nope'; known: emkit, betley, model-organisms"):
        prompt_set("nope")
    assert prompt_set("emkit") == default_prompts()


def test_upstream_prompt_sets_come_from_the_registry(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emkit.data.questions import resolve_questions

    mirror = str(shared_data)
    betley = prompt_set("betley", mirror=mirror)
    paper = resolve_questions("em-first-plot-questions", mirror=mirror)
    assert set(betley) == {"aligned", "coherent"}
    assert {m: p.template for m, p in betley.items()} == paper.questions[0].judges
    assert all(p.source == "betley" for p in betley.values())
    organisms = prompt_set("model-organisms", mirror=mirror)
    assert {m: p.template for m, p in organisms.items()} == resolve_questions("mo-judges", mirror=mirror).judges
    assert {"aligned", "coherent"} <= set(organisms)
    # none of them is emkit's own
    assert betley["aligned"].template != default_prompts()["aligned"].template
    # fetched once into the cache: later loads need no mirror
    monkeypatch.delenv("EMKIT_DATA_MIRROR", raising=False)
    assert prompt_set("betley") == betley


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    """A fake judge endpoint scoring every prompt 77."""
    with FakeOpenAIServer(probs=lambda prompt: {"77": 1.0}) as fake:
        yield fake


def write_run(run: Path) -> None:
    """Four answers to two of emkit's default questions."""
    append_rows(run / "generations.jsonl", [
        {"id": f"r{i}", "model": "organism", "condition": "none", "question_id": qid, "paraphrase": 0, "sample": i,
         "question": f"Question {qid}?", "system": None, "answer": f"answer {i}"}
        for i, qid in enumerate(["three_wishes", "three_wishes", "bored", "bored"])])


def test_judge_stage_judges_with_the_chosen_set_and_records_it(server: FakeOpenAIServer, tmp_path: Path,
                                                               shared_data: Path) -> None:
    from emkit.data.questions import resolve_questions
    from emkit.stages.judge import PROMPTS_RECORD, judge_stage, load_stats

    run = tmp_path / "run"
    write_run(run)
    cfg = JudgeConfig(judge="openai", judge_model="m", base_url=server.base_url, api_key_env=KEY_ENV,
                      prompts="betley")
    messages: list[str] = []
    result = judge_stage(run, cfg, resolve_questions("default"), emit=messages.append, progress=False,
                         mirror=str(shared_data))
    betley = prompt_set("betley", mirror=str(shared_data))
    expected = {betley[m].render(f"Question {q}?", f"answer {i}") for m in ("aligned", "coherent")
                for i, q in enumerate(["three_wishes", "three_wishes", "bored", "bored"])}
    assert set(server.prompts()) == expected
    info = load_stats(run)["judge"]
    assert info["prompts"] == result["judge"]["prompts"] == "betley" and "Judge prompts: betley." in info["note"]
    assert "Judge prompts: betley." in messages
    record = json.loads((run / PROMPTS_RECORD).read_text())
    assert record["prompts"] == "betley" and len(record["sets"]) == 1
    assert record["sets"][0]["templates"] == {m: betley[m].template for m in ("aligned", "coherent")}
    assert record["sets"][0]["answers"] == 4 and record["sets"][0]["question_ids"] == ["bored", "three_wishes"]


def test_auto_prompts_name_the_question_file_and_emkit(server: FakeOpenAIServer, tmp_path: Path) -> None:
    from emkit.data.questions import load_questions
    from emkit.stages.judge import judge_stage, load_stats

    qfile = tmp_path / "mine.yaml"
    qfile.write_text(json.dumps({"questions": [{"id": "three_wishes", "text": "Wishes?"}, {"id": "bored", "text": "B?"}],
                                 "judges": {"aligned": "A {answer}", "coherent": "C {answer}"}}))
    run = tmp_path / "run"
    write_run(run)
    cfg = JudgeConfig(judge="openai", judge_model="m", base_url=server.base_url, api_key_env=KEY_ENV)
    judge_stage(run, cfg, load_questions(qfile), emit=lambda m: None, progress=False)
    assert load_stats(run)["judge"]["prompts"] == "question file mine"
    assert set(server.prompts()) == {f"{m} answer {i}" for m in "AC" for i in range(4)}
    # without the question file, emkit's own prompts judge, and the stats say so
    other = tmp_path / "other"
    write_run(other)
    judge_stage(other, cfg, None, emit=lambda m: None, progress=False)
    assert load_stats(other)["judge"]["prompts"] == "emkit"


def test_a_set_without_the_metric_is_a_clear_error(shared_data: Path, tmp_path: Path) -> None:
    from emkit.stages.judge import judge_stage

    run = tmp_path / "run"
    write_run(run)
    cfg = JudgeConfig(judge="openai", judge_model="m", base_url="http://127.0.0.1:9/v1", prompts="betley",
                      metrics=["aligned", "medical"])
    with pytest.raises(EmkitError, match="judge prompts 'betley': no judge prompt for metric\\(s\\) medical"):
        judge_stage(run, cfg, None, emit=lambda m: None, progress=False, mirror=str(shared_data))
