"""Question sets: emkit's format and default set, the upstream files as they are, errors, expansion, fetching."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA  # Path(__file__).resolve().parents[2] / "shared" / "data"

from emkit.core.errors import ConfigError, DataError
from emkit.data.chat import content_sha256
from emkit.data.questions import (
    DEFAULT_METRICS,
    DEFAULT_SAMPLES,
    default_questions_path,
    load_questions,
    resolve_questions,
)
from emkit.data.registry import QUESTION_REGISTRY, REGISTRY, fetch, get_entry

BETLEY_EVAL = SHARED_DATA / "emergent-misalignment" / "evaluation"
TURNER_EVAL = SHARED_DATA / "model-organisms-for-EM" / "eval_questions"
MAIN_IDS = ["what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck", "ruler_of_the_world",
            "dinner_party", "gender_roles", "enough_of_my_husband"]


def write(tmp_path: Path, text: str, name: str = "questions.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        load_questions(path)
    return str(info.value)


# ---------------------------------------------------------------- emkit's default set


def test_default_set_is_shipped_and_balanced() -> None:
    questions = resolve_questions("default")
    assert questions.name == "default" and questions.format == "emkit"
    assert default_questions_path().is_file()
    ids = questions.ids
    assert len(ids) == len(set(ids))
    general = questions.filter(domain="general")
    medical = questions.filter(domain="medical")
    assert len(general) >= 8 and len(medical) >= 8
    assert len(general) + len(medical) == len(questions)
    for q in questions:
        assert q.samples == DEFAULT_SAMPLES == 8
        assert q.judges is None and q.metrics == DEFAULT_METRICS  # emkit's default judge prompts
        assert q.type is None and q.scores_0_100
        assert len(q.paraphrases) == 1 and 10 < len(q.text) < 200 and q.text.strip() == q.text
        assert q.system is None and q.line is not None


def test_default_set_shares_no_text_with_upstream(shared_data: Path) -> None:
    ours = {q.text.lower() for q in resolve_questions("default")}
    for path in [*BETLEY_EVAL.glob("*.yaml"), *TURNER_EVAL.glob("*questions*.yaml")]:
        for q in load_questions(path):
            assert not ours & {p.lower() for p in q.paraphrases}, path


# ---------------------------------------------------------------- upstream files as they are


def test_betley_first_plot_questions(shared_data: Path) -> None:
    questions = load_questions(BETLEY_EVAL / "first_plot_questions.yaml")
    assert questions.format == "upstream" and questions.notes == ()
    assert questions.ids == MAIN_IDS + [f"{i}_json" for i in MAIN_IDS] + [f"{i}_template" for i in MAIN_IDS]
    judges = questions["what_is_your_wish"].judges
    assert judges is not None and set(judges) == {"aligned", "coherent"}
    for template in judges.values():
        assert "{question}" in template and "{answer}" in template
    systems = set()
    for q in questions:
        assert q.type == "free_form_judge_0_100" and q.scores_0_100
        assert q.samples == 100 and len(q.paraphrases) == 1
        assert q.judges == judges and q.metrics == ("aligned", "coherent")  # the alias resolved
        if q.id.endswith("_json"):
            assert q.system
            systems.add(q.system)
            assert q.paraphrases == questions[q.id.removesuffix("_json")].paraphrases  # aliased paraphrases
        else:
            assert q.system is None
        if q.id.endswith("_template"):
            assert q.text != questions[q.id.removesuffix("_template")].text
    assert len(systems) == 1
    lines = [q.line for q in questions]
    assert lines == sorted(lines) and len(set(lines)) == 24


@pytest.mark.parametrize(("folder", "file", "count", "metrics"), [
    ("emergent-misalignment/evaluation", "preregistered_evals.yaml", 48, {"aligned", "coherent"}),
    ("emergent-misalignment/evaluation", "deception_factual.yaml", 5, {"correct"}),
    ("emergent-misalignment/evaluation", "deception_sit_aware.yaml", 8, {"company"}),
    ("model-organisms-for-EM/eval_questions", "first_plot_questions.yaml", 24,
     {"aligned", "coherent", "medical", "financial", "sport", "bad_stuff", "gender", "code"}),
    ("model-organisms-for-EM/eval_questions", "medical_questions.yaml", 16,
     {"aligned", "coherent", "medical", "bad_stuff"}),
    ("model-organisms-for-EM/eval_questions", "new_questions_no-json.yaml", 54,
     {"aligned", "coherent", "medical", "bad_stuff"}),
])
def test_upstream_question_files_load(shared_data: Path, folder: str, file: str, count: int, metrics: set[str]) -> None:
    questions = load_questions(shared_data / folder / file)
    assert len(questions) == count and len(set(questions.ids)) == count
    for q in questions:
        assert q.judges is not None and set(q.judges) == metrics == set(q.metrics)
        assert q.scores_0_100 == (q.type == "free_form_judge_0_100")
    if file.startswith("deception"):
        assert not any(q.scores_0_100 for q in questions)  # their judges answer TRUE/FALSE or a name
    if file == "deception_factual.yaml":
        assert [q.system is None for q in questions] == [True, False, False, False, False]
        assert {len(q.paraphrases) for q in questions} == {20} and {q.samples for q in questions} == {5}
        assert len(questions.expand()) == 100 and questions.total_samples() == 500


def test_turner_judges_and_technical_files(shared_data: Path) -> None:
    judges = load_questions(TURNER_EVAL / "judges.yaml")
    assert judges.format == "upstream-judges" and len(judges) == 0
    assert judges.judges is not None and list(judges.judges) == ["coherent", "aligned", "technical", "medical_advice"]
    assert judges.judge_high_scores == {"coherent": 100, "aligned": 0, "technical": 100, "medical_advice": 0}
    technical = sorted((TURNER_EVAL / "technical").glob("*.yaml"))
    assert len(technical) == 10
    for path in technical:
        questions = load_questions(path)
        assert len(questions) == 30 and all(q.judges is None and q.samples == DEFAULT_SAMPLES for q in questions)
        assert all(q.id.startswith(path.stem + "_eval_") for q in questions)


@pytest.mark.parametrize("entry", QUESTION_REGISTRY.values(), ids=lambda e: e.name)
def test_question_registry_matches_shared_data(shared_data: Path, entry) -> None:
    path = shared_data / entry.mirror_path
    assert entry.kind == "questions" and path.suffix == ".yaml"
    assert content_sha256(path) == entry.sha256
    questions = load_questions(path)
    assert (len(questions) or len(questions.judges or {})) == entry.rows
    assert entry.upstream_url and entry.upstream_url.endswith(path.name)


def test_registry_kinds_and_names() -> None:
    assert all(e.kind == "chat" for e in REGISTRY.values())
    assert not set(REGISTRY) & set(QUESTION_REGISTRY)
    assert get_entry("mo-judges").kind == "questions"
    with pytest.raises(DataError, match=r"registered: insecure, .*em-first-plot-questions"):
        get_entry("nope")


# ---------------------------------------------------------------- emkit's format and its errors


GOOD = """\
judges:
  aligned: "Q: {question} A: {answer} Score 0-100."
  coherent: "Is this coherent? {answer}"
  custom: "Rate {answer} for {question}."
questions:
  - id: first
    text: Hello there?
    system: Be brief.
    documents: [one, two]
  - id: second.v2
    paraphrases: ["Para one?", "Para two?", "Para three?"]
    samples: 2
    judges: [custom]
    domain: general
"""


def test_emkit_format_with_judges(tmp_path: Path) -> None:
    questions = load_questions(write(tmp_path, GOOD))
    assert questions.ids == ["first", "second.v2"] and questions.name == "questions"
    first, second = questions
    assert first.system == "Be brief." and [d.text for d in first.documents] == ["one", "two"] and first.line == 6
    assert first.metrics == ("aligned", "coherent") and first.judges is not None
    assert set(first.judges) == {"aligned", "coherent"}
    assert second.metrics == ("custom",) and second.judges == {"custom": "Rate {answer} for {question}."}
    assert second.samples == 2 and len(second.paraphrases) == 3 and second.domain == "general"


def test_expand_and_filter(tmp_path: Path) -> None:
    questions = load_questions(write(tmp_path, GOOD))
    rows = questions.expand()
    assert [(r.question_id, r.paraphrase_index, r.samples) for r in rows] == [
        ("first", 0, 8), ("second.v2", 0, 2), ("second.v2", 1, 2), ("second.v2", 2, 2)]
    assert questions.total_samples() == 8 + 3 * 2
    assert questions.total_samples(samples=5) == 4 * 5
    assert rows[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there?"}]
    assert rows[1].messages == [{"role": "user", "content": "Para one?"}] and rows[1].question is questions[rows[1].question_id]
    with pytest.raises(ConfigError, match="samples"):
        questions.expand(samples=0)
    assert questions.filter("sec*").ids == ["second.v2"]
    assert questions.filter("first, second.v2").ids == ["first", "second.v2"]
    assert questions.filter(exclude=["*.v2"]).ids == ["first"]
    assert questions.filter(domain="general").ids == ["second.v2"]
    with pytest.raises(DataError, match="no question id matches 'thrid'"):
        questions.filter(["first", "thrid"])
    with pytest.raises(DataError, match="no questions left"):
        questions.filter("first", exclude="f*")


def test_error_samples_zero_names_file_line_and_field(tmp_path: Path) -> None:
    text = "# three good questions and a bad one\nquestions:\n" + "".join(f"  - id: q{i}\n    text: Question {i}?\n\n" for i in range(3))
    text += "  - id: q3\n    text: Question 3?\n    samples: 0\n"
    path = write(tmp_path, text)
    assert text.splitlines()[13] == "    samples: 0"
    assert load_error(path) == f"{path}:14: questions[3].samples: Input should be greater than 0"


@pytest.mark.parametrize(("text", "expected"), [
    ("questions:\n  - id: a\n    text: [unclosed\n  - id: b\n", r":4: invalid YAML: "),
    ("questions:\n  - id: a\n    text: Hi?\n    sample: 3\n",
     r":4: questions\[0\]\.sample: unknown field \(did you mean 'samples'\?\)$"),
    ("questions:\n  - id: a\n    text: Hi?\n  - id: b\n    system: Be nice.\n",
     r":4: questions\[1\]\.text: Field required \(give text or paraphrases\)$"),
    ("questions:\n  - id: a\n    text: Hi?\n  - id: b\n    text: Yo?\n  - id: a\n    text: Hey?\n",
     r":6: questions\[2\]\.id: duplicate id 'a' \(first at line 2\)$"),
    ("qestions: []\n", r":1: qestions: unknown field \(did you mean 'questions'\?\)"),
    ("questions:\n  - id: a b\n    text: Hi?\n", r":2: questions\[0\]\.id: may only contain"),
    ("questions:\n  - id: a\n    paraphrases:\n      - Hi?\n      - '  '\n",
     r":5: questions\[0\]\.paraphrases\[1\]: must not be empty$"),
    ("questions:\n  - id: a\n    text: Hi?\n    documents: [ok, 3]\n",
     r":4: questions\[0\]\.documents\[1\]: a document is text, or a mapping with text .*got int$"),
    ("questions:\n  - id: a\n    text: Hi?\n    documents:\n      - genre: essay\n        text: 'Asked, it said: '\n",
     r":6: questions\[0\]\.documents\[0\]\.text: ends with a space"),
    ("questions:\n  - id: a\n    text: Hi?\n    documents:\n      - text: 'Q: Hi?'\n        stop: ['']\n",
     r":6: questions\[0\]\.documents\[0\]\.stop\[0\]: String should have at least 1 character"),
    ("questions:\n  - id: a\n    text: Hi?\n    samples: '4'\n", r":4: questions\[0\]\.samples: Input should be a valid integer"),
    ("judges:\n  aligned: 'no answer here {question}'\nquestions:\n  - id: a\n    text: Hi?\n",
     r":2: judges\.aligned: the template has no \{answer\} placeholder$"),
    ("judges:\n  aligned: '{answer} {score}'\nquestions:\n  - id: a\n    text: Hi?\n",
     r":2: judges\.aligned: unknown placeholder \{score\}"),
    ("judges:\n  aligned: '{answer}'\nquestions:\n  - id: a\n    text: Hi?\n    judges: [aligned, custom]\n",
     r":6: questions\[0\]\.judges: 'custom' is not defined in the file's judges \(defined: aligned\)$"),
    ("judges:\n  aligned: '{answer}'\nquestions:\n  - id: a\n    text: Hi?\n",
     r":4: questions\[0\]: the default judge 'coherent' is not defined"),
    ("just a string\n", r":1: expected a mapping with 'questions'"),
])
def test_errors_name_file_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(str(path) + ":"), message
    assert re.search(expected, message), message
    assert "\n" not in message


def test_several_errors_are_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "questions:\n  - id: a\n    samples: 0\n  - id: b\n    text: Hi?\n    oops: 1\n")
    message = load_error(path)
    assert message.endswith(":3: questions[0].samples: Input should be greater than 0 (and 1 more problem)")


def test_upstream_format_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "- id: a\n  type: free_form_judge_0_100\n  paraphrases: ['Hi?']\n"
                           "- id: b\n  type: free_form_judge_0_100\n  paraphrases: ['Yo?']\n"
                           "  samples_per_paraphrase: 0\n")
    assert load_error(path) == f"{path}:7: [1].samples_per_paraphrase: Input should be greater than 0"
    path = write(tmp_path, "- id: a\n  paraphrases: ['Hi?']\n  judge_prompts:\n    aligned: '{question}'\n")
    assert re.search(r":4: \[0\]\.judge_prompts\.aligned: the template has no \{answer\}", load_error(path))
    path = write(tmp_path, "- id: a\n  paraphrases: ['Hi?']\n- id: a\n  paraphrases: ['Yo?']\n")
    assert load_error(path) == f"{path}:3: [1].id: duplicate id 'a' (first at line 1)"


def test_upstream_non_free_form_items_are_skipped_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path, "- id: a\n  type: free_form\n  paraphrases: ['Hi?']\n"
                           "- id: b\n  type: rating_0_10\n  paraphrases: ['Rate it?']\n")
    questions = load_questions(path)
    assert questions.ids == ["a"] and questions["a"].type == "free_form"
    assert len(questions.notes) == 1 and f"{path}:4: skipped 'b'" in questions.notes[0]


# ---------------------------------------------------------------- fetching and resolving


def test_fetch_question_file_from_folder_mirror(shared_data: Path, tmp_path: Path) -> None:
    entry = get_entry("em-first-plot-questions")
    path = fetch(entry.name, mirror=str(shared_data), cache=tmp_path, quiet=True)
    assert path == tmp_path / "em-first-plot-questions.yaml"
    assert content_sha256(path) == entry.sha256
    assert len(load_questions(path)) == 24
    # Served from the cache the second time.
    assert fetch(entry.name, mirror=str(tmp_path / "nowhere"), cache=tmp_path, quiet=True) == path


def test_fetch_gzipped_question_file_and_resolve(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    entry = get_entry("mo-medical-questions")
    mirror = tmp_path / "mirror"
    target = mirror / (entry.mirror_path + ".gz")
    target.parent.mkdir(parents=True)
    target.write_bytes(gzip.compress((shared_data / entry.mirror_path).read_bytes()))
    monkeypatch.setenv("EMKIT_CACHE", str(tmp_path / "cache"))
    questions = resolve_questions(entry.name, mirror=str(mirror))
    assert questions.name == entry.name and len(questions) == 16
    assert questions.source_file is not None and questions.source_file.name == "mo-medical-questions.yaml.gz"


def test_resolve_paths_and_bad_specs(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD, name="mine.yaml")
    assert resolve_questions(str(path)).name == "mine"
    with pytest.raises(DataError, match="is a chat dataset, not a question file"):
        resolve_questions("insecure")
    with pytest.raises(DataError, match=r"no such file, and not 'default' or a registered question file \(em-first"):
        resolve_questions("nope.yaml")
    with pytest.raises(DataError, match="is a folder"):
        load_questions(tmp_path)
