"""Question sets for EM evaluation: emkit's YAML format, the upstream EM formats as they are, and
expansion into prompts.

emkit's format is a mapping:

    judges:                       # optional: metric -> judge prompt with {answer} (and usually {question});
      aligned: "..."              #   absent: emkit's default judge prompts (emkit.judge)
    questions:
      - id: three_wishes          # unique; letters, digits, '_', '.', '-'
        text: "..."               # or paraphrases: ["...", "..."]
        system: "..."             # optional system prompt
        samples: 8                # answers per paraphrase (default 8)
        judges: [aligned, coherent]   # metrics to apply (the default); a file with `judges:` must define them
        domain: general           # optional label, e.g. general, medical
        documents:                # optional: naturalistic documents for the predictive mode
          - genre: podcast        #   a label (podcast, essay, text-messages, forum, lecture, script, ...)
            text: "..."           #   sets up the question and ends exactly where the answer begins
            stop: ["\nHOST:"]     #   optional: strings that end the answering speaker's turn
          - "..."                 #   a bare string is a document with only text

The upstream formats (a top-level list) are read as they are, anchors and aliases included:

- question files of emergent-misalignment and model-organisms-for-EM: items with `id`, `type`,
  `paraphrases`, `system`, `samples_per_paraphrase`, `judge` (their judge model; emkit picks its own at
  run time, so it is not kept) and `judge_prompts` (metric -> template). Items of every `free_form*`
  type are kept with their type; `Question.scores_0_100` is False for those whose judges do not answer
  0-100 (`free_form_judge` in the deception files: TRUE/FALSE, a company name). Items of any other type
  cannot be asked as a free-form prompt and are skipped with a note in `QuestionSet.notes`.
- model-organisms' `technical/*.yaml`: items with `id` and `question`.
- model-organisms' `judges.yaml`: items `{metric: template, high_score: N}`, read as a set with no
  questions whose `judges` are those templates.

Every problem is reported as `FILE:LINE: FIELD: problem`, e.g.
`questions.yaml:14: questions[3].samples: Input should be greater than 0`.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from emkit.core.errors import ConfigError, DataError
from emkit.core.text import open_text, utf8_problem
from emkit.data.templates import template_problem

DEFAULT_SAMPLES = 8
DEFAULT_METRICS: tuple[str, ...] = ("aligned", "coherent")
DEFAULT_SET = "default"
# Upstream types whose judges answer with a number from 0 to 100 (the EM judges); None: emkit's format.
SCORED_0_100_TYPES = frozenset({None, "free_form_judge_0_100"})

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ---------------------------------------------------------------- in-memory model


@dataclass(frozen=True)
class Document:
    """A naturalistic document that sets up a question and ends where the answer begins (predictive mode).

    `stop` holds strings that end the answering speaker's turn (besides the speaker labels found in
    the text, see `emkit.generate.modes.turn_stops`); `{question}` in the text is replaced by the
    question, so one document can frame any question.
    """

    text: str
    genre: str | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Question:
    """One evaluation question, from either format."""

    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples: int = DEFAULT_SAMPLES  # answers per paraphrase
    judges: dict[str, str] | None = field(default=None, hash=False)  # metric -> template; None: emkit's
    metrics: tuple[str, ...] = DEFAULT_METRICS  # judged metrics; equal to judges' keys when judges is set
    domain: str | None = None
    type: str | None = None  # upstream type, None in emkit's format
    documents: tuple[Document, ...] = ()
    source_file: Path | None = None
    line: int | None = None

    @property
    def text(self) -> str:
        """The first paraphrase."""
        return self.paraphrases[0]

    @property
    def scores_0_100(self) -> bool:
        """Whether its judges answer with a 0-100 score (the EM alignment/coherence judges)."""
        return self.type in SCORED_0_100_TYPES

    @property
    def where(self) -> str:
        """`file:line` of the question, for messages."""
        return f"{self.source_file}:{self.line}" if self.source_file else self.id


@dataclass(frozen=True)
class PromptRow:
    """One prompt to sample: a question's paraphrase and how many answers to draw for it."""

    question_id: str
    paraphrase_index: int
    text: str
    system: str | None
    samples: int
    question: Question = field(repr=False, compare=False)

    @property
    def messages(self) -> list[dict[str, str]]:
        """Chat messages for this prompt (system first when there is one)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": self.text}]


@dataclass(frozen=True)
class QuestionSet:
    """An ordered set of questions with unique ids, and where it came from."""

    questions: tuple[Question, ...]
    name: str
    source_file: Path | None = None
    format: str = "emkit"  # emkit, upstream, upstream-judges
    judges: dict[str, str] | None = field(default=None, hash=False)  # the file's own judge templates
    judge_high_scores: dict[str, int] = field(default_factory=dict, hash=False)  # upstream judges.yaml, as is
    notes: tuple[str, ...] = ()  # what was skipped while reading, and why

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    def __getitem__(self, question_id: str) -> Question:
        for question in self.questions:
            if question.id == question_id:
                return question
        raise KeyError(question_id)

    def __repr__(self) -> str:
        return f"QuestionSet({self.name!r}, {len(self)} questions, format={self.format!r})"

    @property
    def ids(self) -> list[str]:
        """Question ids in order."""
        return [q.id for q in self.questions]

    def filter(
        self,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        domain: str | None = None,
    ) -> QuestionSet:
        """Questions whose id matches any include glob and no exclude glob (comma-separated strings work)."""
        patterns = _patterns(include)
        for pattern in patterns:
            # An include that matches nothing is almost always a typo; say so rather than run less.
            if not any(fnmatch.fnmatchcase(q.id, pattern) for q in self.questions):
                ids = ", ".join(self.ids)
                raise DataError(f"{self.name}: no question id matches '{pattern}' (ids: {ids})")
        excluded = _patterns(exclude)
        kept = tuple(
            q for q in self.questions
            if (not patterns or any(fnmatch.fnmatchcase(q.id, p) for p in patterns))
            and not any(fnmatch.fnmatchcase(q.id, p) for p in excluded)
            and (domain is None or q.domain == domain)
        )
        if not kept:
            raise DataError(f"{self.name}: no questions left after filtering")
        return dataclasses.replace(self, questions=kept)

    def expand(self, samples: int | None = None) -> list[PromptRow]:
        """One row per (question, paraphrase); `samples` overrides every question's count."""
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise ConfigError(f"samples: must be a positive integer, got {samples!r}")
        return [
            PromptRow(q.id, index, text, q.system, samples or q.samples, q)
            for q in self.questions
            for index, text in enumerate(q.paraphrases)
        ]

    def total_samples(self, samples: int | None = None) -> int:
        """Number of answers `expand(samples)` asks for in all."""
        return sum(row.samples for row in self.expand(samples))


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


# ---------------------------------------------------------------- validation models


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("may only contain letters, digits, '_', '.' and '-'")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _template(value: str) -> str:
    problem = template_problem(value)
    if problem:
        raise ValueError(problem)
    return value


Name = Annotated[str, AfterValidator(_name)]
Text = Annotated[str, AfterValidator(_not_blank)]
Template = Annotated[str, AfterValidator(_template)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _EmkitFile(_Strict):
    judges: dict[Name, Template] | None = None
    questions: list[dict[str, Any]] = Field(min_length=1)


class _DocumentItem(_Strict):
    text: Text
    genre: Name | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"text": value}
        if not isinstance(value, dict):
            raise ValueError(f"a document is text, or a mapping with text (and optional genre, stop); "
                             f"got {type(value).__name__}")
        return value

    @field_validator("text")
    @classmethod
    def _ends_at_answer(cls, value: str) -> str:
        # The answer's first token carries its own leading space; a document ending in one would
        # make the model continue from an unnatural split.
        if value != value.rstrip(" \t"):
            raise ValueError("ends with a space; end the document right after the speaker label (e.g. 'GUEST:')")
        return value


class _EmkitItem(_Strict):
    id: Name
    text: Text | None = None
    paraphrases: list[Text] | None = Field(None, min_length=1)
    system: Text | None = None
    samples: int | None = Field(None, gt=0, strict=True)
    judges: list[Name] | None = None
    domain: Text | None = None
    documents: list[_DocumentItem] | None = None


class _UpstreamItem(_Strict):
    id: Name
    type: str | None = None
    paraphrases: list[Text] | None = Field(None, min_length=1)
    question: Text | None = None  # model-organisms technical/*.yaml
    system: Text | None = None
    samples_per_paraphrase: int | None = Field(None, gt=0, strict=True)
    judge: str | None = None
    judge_prompts: dict[Name, Template] | None = None


class _JudgeEntry(_Strict):  # one item of model-organisms' judges.yaml
    metric: Name
    template: Template
    high_score: int = Field(strict=True)


# ---------------------------------------------------------------- reading


Loc = tuple[str | int, ...]


class _Problems:
    """Collects `FILE:LINE: FIELD: problem` messages, locating fields in the composed YAML."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root
        self.messages: list[str] = []

    def line(self, loc: Loc) -> int:
        """Line of the deepest node of `loc` that exists (1-based)."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else 1
        for part in loc:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                match = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                # An alias points back at its anchor; the line of the key that uses it says more.
                line = max(line, node.start_mark.line + 1)
            else:
                break
        return line

    def add(self, loc: Loc, message: str, line: int | None = None) -> None:
        """Record a problem at field `loc`."""
        where = f"{self.path}:{line or self.line(loc)}"
        dotted = _dotted(loc)
        self.messages.append(f"{where}: {dotted}: {message}" if dotted else f"{where}: {message}")

    def add_validation(self, exc: ValidationError, prefix: Loc, model: type[BaseModel]) -> None:
        """Record every error of a pydantic validation of the value at `prefix`."""
        # An unknown key is usually a misspelt known one: say that before the "missing" it causes.
        for err in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
            loc = prefix + tuple(part for part in err["loc"] if part != "[key]")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
                msg = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
            elif err["type"].endswith("_type") and "input" in err:
                msg += f" (got {type(err['input']).__name__})"
            self.add(loc, msg)

    def raise_if_any(self) -> None:
        """Raise one DataError: the first problem and how many more there are."""
        if self.messages:
            more = len(self.messages) - 1
            tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
            raise DataError(self.messages[0] + tail)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a YAML file (maybe gzipped) into data and its node tree; errors name file and line."""
    try:
        handle = open_text(path, errors="surrogateescape")  # bad bytes are located below, by line
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a question YAML file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with handle:
            text = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: truncated or corrupt file ({exc})") from None
    undecodable = utf8_problem(text)
    if undecodable is not None:
        raise DataError(f"{path}:{undecodable[0]}: {undecodable[1]}")
    # One parse gives both the data and the node marks that locate every field.
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise DataError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    return data, node


def load_questions(path: str | Path, name: str | None = None) -> QuestionSet:
    """Read a question file in emkit's or an upstream format (detected from its shape) and validate it."""
    path = Path(path)
    data, root = _read_yaml(path)
    problems = _Problems(path, root)
    name = name or path.name.split(".")[0]
    if data is None:
        raise DataError(f"{path}: empty file, expected questions")
    if isinstance(data, dict):
        result = _read_emkit(data, problems, name)
    elif isinstance(data, list) and data and all(
        isinstance(item, dict) and "id" not in item and "high_score" in item for item in data
    ):
        result = _read_judges(data, problems, name)
    elif isinstance(data, list):
        if not data:
            raise DataError(f"{path}:1: empty list, expected questions")
        result = _read_upstream(data, problems, name)
    else:
        raise DataError(
            f"{path}:1: expected a mapping with 'questions' (emkit format) or a list of questions "
            f"(upstream format), got {type(data).__name__}"
        )
    problems.raise_if_any()
    assert result is not None
    return result


def _check_ids(questions: list[tuple[Loc, Question]], problems: _Problems) -> None:
    first: dict[str, int] = {}
    for loc, question in questions:
        line = problems.line(loc + ("id",))
        if question.id in first:
            message = f"duplicate id '{question.id}' (first at line {first[question.id]})"
            problems.add(loc + ("id",), message, line)
        else:
            first[question.id] = line


def _read_emkit(data: dict[str, Any], problems: _Problems, name: str) -> QuestionSet | None:
    try:
        head = _EmkitFile.model_validate(data)
    except ValidationError as exc:
        problems.add_validation(exc, (), _EmkitFile)
        return None
    file_judges = head.judges
    questions: list[tuple[Loc, Question]] = []
    for index, raw in enumerate(head.questions):
        loc: Loc = ("questions", index)
        try:
            item = _EmkitItem.model_validate(raw)
        except ValidationError as exc:
            problems.add_validation(exc, loc, _EmkitItem)
            continue
        if (item.text is None) == (item.paraphrases is None):
            problems.add(loc + ("text",), "Field required (give text or paraphrases)" if item.text is None
                         else "give either text or paraphrases, not both")
            continue
        metrics = tuple(item.judges) if item.judges is not None else DEFAULT_METRICS
        judges = None
        if file_judges is not None:
            missing = [m for m in metrics if m not in file_judges]
            if missing:
                defined = f"is not defined in the file's judges (defined: {', '.join(file_judges)})"
                if item.judges is not None:
                    problems.add(loc + ("judges",), f"'{missing[0]}' {defined}")
                else:
                    problems.add(loc, f"the default judge '{missing[0]}' {defined}; list the question's judges")
                continue
            judges = {m: file_judges[m] for m in metrics}
        paraphrases = (item.text,) if item.text is not None else tuple(item.paraphrases or ())
        questions.append((loc, Question(
            id=item.id, paraphrases=paraphrases, system=item.system, samples=item.samples or DEFAULT_SAMPLES,
            judges=judges, metrics=metrics, domain=item.domain, documents=tuple(
                Document(d.text, d.genre, tuple(d.stop or ())) for d in item.documents or ()),
            source_file=problems.path, line=problems.line(loc),
        )))
    _check_ids(questions, problems)
    return QuestionSet(tuple(q for _, q in questions), name, problems.path, "emkit", file_judges)


def _read_upstream(data: list[Any], problems: _Problems, name: str) -> QuestionSet | None:
    questions: list[tuple[Loc, Question]] = []
    notes: list[str] = []
    for index, raw in enumerate(data):
        loc: Loc = (index,)
        if not isinstance(raw, dict):
            problems.add(loc, f"expected a question (mapping with id and paraphrases), got {type(raw).__name__}")
            continue
        try:
            item = _UpstreamItem.model_validate(raw)
        except ValidationError as exc:
            problems.add_validation(exc, loc, _UpstreamItem)
            continue
        if (item.paraphrases is None) == (item.question is None):
            problems.add(loc + ("paraphrases",), "Field required" if item.question is None
                         else "give either paraphrases or question, not both")
            continue
        if item.type is not None and not item.type.startswith("free_form"):
            notes.append(f"{problems.path}:{problems.line(loc)}: skipped '{item.id}': type '{item.type}' "
                         "is not a free-form question")
            continue
        paraphrases = tuple(item.paraphrases) if item.paraphrases is not None else (item.question or "",)
        judges = dict(item.judge_prompts) if item.judge_prompts else None
        questions.append((loc, Question(
            id=item.id, paraphrases=paraphrases, system=item.system,
            samples=item.samples_per_paraphrase or DEFAULT_SAMPLES, judges=judges,
            metrics=tuple(judges) if judges else DEFAULT_METRICS, type=item.type,
            source_file=problems.path, line=problems.line(loc),
        )))
    _check_ids(questions, problems)
    return QuestionSet(tuple(q for _, q in questions), name, problems.path, "upstream", notes=tuple(notes))


def _read_judges(data: list[dict[str, Any]], problems: _Problems, name: str) -> QuestionSet | None:
    judges: dict[str, str] = {}
    high: dict[str, int] = {}
    for index, raw in enumerate(data):
        loc: Loc = (index,)
        metrics = [key for key in raw if key != "high_score"]
        if len(metrics) != 1:
            keys = ", ".join(map(str, raw))
            problems.add(loc, f"expected one judge prompt and high_score, got keys {keys}")
            continue
        metric = metrics[0]
        try:
            template = _JudgeEntry.model_validate({"metric": metric, "template": raw[metric],
                                                   "high_score": raw["high_score"]})
        except ValidationError as exc:
            for err in exc.errors():
                field_name = err["loc"][0]
                key = metric if field_name in ("metric", "template") else "high_score"
                problems.add(loc + (key,), err["msg"].removeprefix("Value error, "))
            continue
        if metric in judges:
            problems.add(loc + (metric,), f"judge '{metric}' defined twice")
            continue
        judges[metric] = template.template
        high[metric] = template.high_score
    return QuestionSet((), name, problems.path, "upstream-judges", judges, high)


# ---------------------------------------------------------------- resolving


def default_questions_path() -> Path:
    """Path of emkit's own question set, shipped with the package."""
    return Path(str(resources.files("emkit.data").joinpath("questions/default.yaml")))


def resolve_questions(spec: str, mirror: str | None = None) -> QuestionSet:
    """A question spec is 'default' (emkit's set), a file path, or a registered question-file name."""
    from emkit.data.registry import QUESTION_REGISTRY, REGISTRY, fetch

    if spec == DEFAULT_SET:
        return load_questions(default_questions_path(), name=DEFAULT_SET)
    path = Path(spec).expanduser()
    if path.exists():
        return load_questions(path)
    if spec in QUESTION_REGISTRY:
        return load_questions(fetch(spec, mirror=mirror), name=spec)
    if spec in REGISTRY:
        raise DataError(f"questions '{spec}': is a chat dataset, not a question file")
    raise DataError(
        f"questions '{spec}': no such file, and not '{DEFAULT_SET}' or a registered question file "
        f"({', '.join(QUESTION_REGISTRY)})"
    )
