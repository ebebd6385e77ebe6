"""A judge that is any emkit model spec: the same prompts, scored from the model's own number logits.

Same interface and cache as `OpenAIJudge`. The probability of each integer answer 0-100 comes
from `local_numbers.number_probabilities` (numbers spanning several tokens included), and is
aggregated exactly like the API judge's top logprobs. Small models put little probability on
numbers, so `mass` is always recorded; whether such a judge is valid is for judge validation to say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emkit.judge.aggregate import MIN_MASS, score_from_probs
from emkit.judge.cache import JudgeResult, JudgingPass, Judgment, JudgmentCache
from emkit.judge.local_numbers import judge_prompts_as_chat, number_probabilities
from emkit.judge.prompts import JudgePrompt, as_prompts


@dataclass
class LocalJudge:
    """Score with a local model: P(answer = n) for n in 0..100 from its logits, aggregated as the original."""

    spec: str
    min_mass: float = MIN_MASS
    device: str = "auto"
    dtype: str = "auto"
    _loaded: Any = field(default=None, init=False, repr=False)

    @property
    def judge_id(self) -> str:
        """The id cache keys are made from."""
        return f"local:{self.spec}"

    @property
    def endpoint_id(self) -> str:
        """The endpoint identity in cache keys: local, with the dtype the weights run in.

        bfloat16 and float32 weights give different number probabilities, and `auto` resolves to
        either by device, so a run judged on a GPU and resumed on a CPU must not mix the two.
        """
        from emkit.models import resolve_device, resolve_dtype

        dtype = resolve_dtype(self.dtype, resolve_device(self.device))
        return f"local:{str(dtype).removeprefix('torch.')}"

    method = "local-logits"

    def describe(self) -> str:
        """One line naming the judge for logs and reports."""
        return f"local model {self.spec} (probability of each number 0-100 from its own logits)"

    def _model(self) -> Any:
        if self._loaded is None:
            from emkit.models import load_model

            self._loaded = load_model(self.spec, device=self.device, dtype=self.dtype)
            self._loaded.model.eval()
        return self._loaded

    def judge_many_sync(
        self,
        items: Iterable[Any],
        metric_prompts: Mapping[str, str | JudgePrompt] | Iterable[JudgePrompt],
        cache: JudgmentCache,
        progress: bool = True,
    ) -> list[JudgeResult]:
        """Judge every item on every metric, skipping cached judgments and caching each new one at once."""
        from tqdm import tqdm

        plan = JudgingPass.plan(self.judge_id, items, as_prompts(metric_prompts), cache, self.min_mass,
                                endpoint=self.endpoint_id, method=self.method)
        fresh: dict[str, Judgment] = {}
        if plan.todo:
            loaded = self._model()
            for job in tqdm(plan.todo, desc="judge (local)", unit="judgment", disable=not progress):
                prompt = judge_prompts_as_chat(loaded.tokenizer, [job.prompt])[0]
                probs = number_probabilities(loaded.model, loaded.tokenizer, prompt)
                score = dataclasses.replace(score_from_probs(probs, self.min_mass), method="local-logits")
                judgment = Judgment.from_score(job.key, self.judge_id, job.metric, score,
                                               prompt_tokens=len(loaded.tokenizer(prompt)["input_ids"]),
                                               endpoint=self.endpoint_id)
                cache.put(judgment)  # at once: an interrupted pass keeps what it has done
                fresh[job.key] = judgment
        return plan.results(fresh)
