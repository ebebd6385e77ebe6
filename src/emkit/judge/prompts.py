"""Judge prompts: emkit's own (`prompts.yaml`), an upstream project's named set (`prompt_set`), or
those a question file or YAML file gives.

Named sets (`PROMPT_SETS`): `emkit` (emkit's own, written for emkit), `betley` (the judge_prompts of
the original EM paper's first_plot_questions.yaml) and `model-organisms` (model-organisms-for-EM's
judges.yaml). The upstream sets are not shipped: they are fetched through the data registry
(`emkit.data.registry.JUDGE_PROMPT_SETS`), from the cache, a mirror or upstream, checksum verified.

A template has the placeholders `{question}` and `{answer}` and is rendered with `str.format`,
as the question files of the field are written for it; any other placeholder is refused when
the prompt is loaded, not halfway through a judging pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emkit.core.errors import ConfigError
from emkit.data.templates import template_problem

PROMPT_SETS = ("emkit", "betley", "model-organisms")


@dataclass(frozen=True)
class JudgePrompt:
    """A metric's name and its template (placeholders `{question}`, `{answer}`)."""

    metric: str
    template: str
    higher_is_better: bool = True
    source: str = "emkit"

    def __post_init__(self) -> None:
        check_template(self.metric, self.template, self.source)

    def render(self, question: str, answer: str) -> str:
        """The prompt text for one question and answer."""
        return self.template.format(question=question, answer=answer)


def check_template(metric: str, template: Any, source: str = "emkit") -> None:
    """Refuse a template that is not text, lacks `{answer}` or has another placeholder."""
    where = f"{source}: judge prompt '{metric}'"
    if not isinstance(metric, str) or not metric.strip():
        raise ConfigError(f"{source}: judge prompt with an empty metric name")
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"{where}: the template must be non-empty text")
    problem = template_problem(template)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def _prompt(metric: str, value: Any, source: str) -> JudgePrompt:
    if isinstance(value, JudgePrompt):
        return value
    if isinstance(value, Mapping):
        extra = set(value) - {"template", "higher_is_better"}
        if "template" not in value or extra:
            raise ConfigError(
                f"{source}: judge prompt '{metric}' must be a template "
                "or have the keys template, higher_is_better"
            )
        return JudgePrompt(metric, value["template"], bool(value.get("higher_is_better", True)), source)
    return JudgePrompt(metric, value, True, source)


def prompts_from(
    spec: Mapping[str, Any] | Sequence[Any], source: str = "judge prompts"
) -> dict[str, JudgePrompt]:
    """Prompts from a mapping metric -> template (a question's `judge_prompts`) or a list of them."""
    if isinstance(spec, Mapping):
        return {str(metric): _prompt(str(metric), value, source) for metric, value in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        prompts: dict[str, JudgePrompt] = {}
        for entry in spec:
            if isinstance(entry, JudgePrompt):
                prompts[entry.metric] = entry
                continue
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{source}: a judge prompt list holds mappings, not {type(entry).__name__}")
            # list entries may carry extra keys beside the one template (e.g. a `high_score`)
            texts = {k: v for k, v in entry.items() if isinstance(v, str)}
            if len(texts) != 1:
                raise ConfigError(f"{source}: each judge prompt entry needs exactly one metric: template")
            ((metric, template),) = texts.items()
            prompts[str(metric)] = JudgePrompt(str(metric), template, True, source)
        return prompts
    raise ConfigError(f"{source}: judge prompts must be a mapping metric -> template")


def default_prompts() -> dict[str, JudgePrompt]:
    """emkit's own judge prompts: aligned, coherent, medical, bad_stuff."""
    text = resources.files("emkit.judge").joinpath("prompts.yaml").read_text(encoding="utf-8")
    return prompts_from(yaml.safe_load(text), source="emkit")


def prompt_set(name: str, mirror: str | None = None) -> dict[str, JudgePrompt]:
    """A named set of judge prompts: emkit's own, or an upstream project's fetched through the data registry."""
    if name == "emkit":
        return default_prompts()
    from emkit.core.errors import DataError
    from emkit.data.questions import load_questions
    from emkit.data.registry import JUDGE_PROMPT_SETS, fetch

    if name not in JUDGE_PROMPT_SETS:
        raise ConfigError(f"unknown judge prompt set '{name}'; known: {', '.join(PROMPT_SETS)}")
    entry = JUDGE_PROMPT_SETS[name]
    questions = load_questions(fetch(entry, mirror=mirror, quiet=True), name=entry)
    if questions.judges:  # a judges file: its templates are the set
        templates = dict(questions.judges)
    else:
        # A question file whose questions carry judge prompts: the set is the one they share; a file
        # whose 0-100 questions disagree has no single set, and guessing one would misreport the judge.
        distinct: dict[tuple, dict[str, str]] = {}
        for question in questions:
            if question.judges and question.scores_0_100:
                distinct.setdefault(tuple(sorted(question.judges.items())), dict(question.judges))
        if len(distinct) != 1:
            raise DataError(f"{questions.source_file}: judge prompt set '{name}' needs one set of judge prompts "
                            f"shared by its 0-100 questions, found {len(distinct)}")
        templates = next(iter(distinct.values()))
    return {metric: JudgePrompt(metric, template, True, name) for metric, template in templates.items()}


def load_prompts(
    spec: str | Path | Mapping[str, Any] | Sequence[Any] | None = None, metrics: Iterable[str] | None = None
) -> dict[str, JudgePrompt]:
    """Judge prompts from emkit's defaults (None), a YAML file, or a mapping; optionally only `metrics`."""
    if spec is None:
        prompts = default_prompts()
    elif isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read judge prompts ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        prompts = prompts_from(data if data is not None else {}, source=str(path))
    else:
        prompts = prompts_from(spec)
    if metrics is None:
        return prompts
    wanted = list(metrics)
    missing = [m for m in wanted if m not in prompts]
    if missing:
        known = ", ".join(sorted(prompts)) or "none"
        raise ConfigError(f"no judge prompt for {', '.join(missing)}; known: {known}")
    return {m: prompts[m] for m in wanted}


def as_prompts(
    metric_prompts: Mapping[str, str | JudgePrompt] | Iterable[JudgePrompt],
) -> dict[str, JudgePrompt]:
    """Normalise what a judging pass is given into metric -> JudgePrompt."""
    if isinstance(metric_prompts, Mapping):
        return prompts_from(metric_prompts)
    return prompts_from(list(metric_prompts))
