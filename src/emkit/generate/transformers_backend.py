"""Batched sampling with transformers: left padding, batches sorted by length, seeded per batch.

The batch plan is a pure function of the jobs and the batch size, and each batch is sampled with
a seed derived from the run seed and its index, so a run that is interrupted and resumed (which
skips the batches already in `generations.jsonl`) produces exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from emkit.core.rowfile import append_rows, finalize, resume_rows


@dataclass(frozen=True)
class PromptJob:
    """One rendered prompt to sample `samples` answers for, as `model` ('base' or 'organism')."""

    model: str
    condition: str
    question_id: str
    paraphrase: int
    question: str
    system: str | None
    prompt: str
    samples: int
    mode: str = "assistant"  # assistant (chat template), predictive (a document), raw (no template)
    stops: tuple[str, ...] = ()  # strings that end the answering speaker's turn (predictive mode)
    stop_pattern: str | None = None  # and a regex that does (a new speaker's line), see emkit.generate.modes
    genre: str | None = None  # the predictive document's genre

    @property
    def key(self) -> str:
        """Stable identity of the prompt within a run."""
        return f"{self.model}/{self.condition}/{self.question_id}/{self.paraphrase}"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of the original protocol by default (temperature 1, top_p 1, 600 tokens)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 32
    seed: int = 0


def batch_seed(seed: int, index: int) -> int:
    """Seed of batch `index`: independent of which batches ran before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def plan_batches(jobs: Sequence[PromptJob], tokenizer: Any, batch_size: int) -> list[list[tuple[PromptJob, int]]]:
    """Expand jobs into (job, sample) items, grouped by model and sorted by prompt length, in batches."""
    lengths = {job.key: len(tokenizer(job.prompt, add_special_tokens=False)["input_ids"]) for job in jobs}
    items = [(job, s) for job in jobs for s in range(job.samples)]
    items.sort(key=lambda it: (it[0].model, lengths[it[0].key], it[0].key, it[1]))
    batches: list[list[tuple[PromptJob, int]]] = []
    for item in items:
        # A batch never mixes base and organism: the adapter is switched per batch.
        if batches and len(batches[-1]) < batch_size and batches[-1][0][0].model == item[0].model:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _generation_config(model: Any, tokenizer: Any, params: SamplingParams) -> Any:
    from transformers import GenerationConfig

    # A fresh config: a model's own generation defaults (top_k 50, repetition penalty, ...) would
    # silently change the protocol.
    greedy = params.temperature == 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else 0,
        max_new_tokens=params.max_new_tokens,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )


Turn = tuple[tuple[str, ...], "str | None"]  # (stop strings, stop regex) of one row


class TurnEnd:
    """Stops each row of a batch once its new text reaches one of that row's turn ends."""

    def __init__(self, tokenizer: Any, prompt_width: int, turns: Sequence[Turn]) -> None:
        self.tokenizer = tokenizer
        self.width = prompt_width
        self.turns = list(turns)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        """True for rows whose turn has ended."""
        from emkit.generate.modes import cut_turn

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, (stops, pattern) in enumerate(self.turns):
            if stops or pattern:
                text = self.tokenizer.decode(input_ids[i, self.width :], skip_special_tokens=True)
                done[i] = cut_turn(text, stops, pattern)[1]
        return done


@torch.inference_mode()
def sample_batch(model: Any, tokenizer: Any, prompts: Sequence[str], params: SamplingParams, seed: int,
                 turns: Sequence[Turn] | None = None) -> list[dict]:
    """Sample one answer per prompt (left-padded batch); returns text, token count and finish reason.

    With `turns` (per prompt: stop strings and a stop regex), a row stops as soon as its turn ends and
    its answer is cut there (finish "turn_end"); `completion` then keeps the uncut text.
    """
    from transformers import StoppingCriteriaList

    from emkit.generate.modes import cut_turn

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    width = enc["input_ids"].shape[1]
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    extra: dict[str, Any] = {}
    if turns is not None and any(stops or pattern for stops, pattern in turns):
        extra["stopping_criteria"] = StoppingCriteriaList([TurnEnd(tokenizer, width, turns)])
    out = model.generate(**enc, generation_config=_generation_config(model, tokenizer, params), **extra)
    new = out[:, width:]
    eos = {t for t in ([tokenizer.eos_token_id] + list(_as_list(model.generation_config.eos_token_id))) if t is not None}
    results = []
    for index, row in enumerate(new.tolist()):
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens = row[:stop] if stop is not None else row
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        result = {"answer": text.strip(), "new_tokens": len(tokens), "finish": "stop" if stop is not None else "length"}
        row_stops, pattern = turns[index] if turns is not None else ((), None)
        if row_stops or pattern:
            kept, cut = cut_turn(text, row_stops, pattern)
            if cut:
                result.update(answer=kept.strip(), finish="turn_end")
            result["completion"] = text
        results.append(result)
    return results


def mode_fields(job: PromptJob) -> dict[str, Any]:
    """What a row records of its prompting mode: the mode, and for template-free prompts the prompt itself."""
    if job.mode == "assistant":
        return {"mode": "assistant"}
    return {"mode": job.mode, "genre": job.genre, "prompt": job.prompt}


def default_model_context(loaded: Any) -> Callable[[str], Any]:
    """'base' answers with the adapter disabled, every other name with the model as loaded."""

    def context(name: str) -> Any:
        return loaded.base() if name == "base" else contextlib.nullcontext(loaded.model)

    return context


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def generate_to_file(
    loaded: Any,
    jobs: Sequence[PromptJob],
    params: SamplingParams,
    path: Path,
    *,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    emit: Callable[[str], None] = print,
    model_context: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Sample every job into `path`, skipping batches already there; returns counts and throughput.

    `model_context(name)` gives a context manager yielding the model that answers as `name` (e.g. a
    steered organism); by default 'base' is the adapter-disabled model and anything else the model as loaded.
    """
    from tqdm import tqdm

    batches = plan_batches(jobs, loaded.tokenizer, params.batch_size)
    planned = [f"{job.key}#{s}" for batch in batches for job, s in batch]
    existing = resume_rows(path, planned, emit)
    done_ids = {r["id"] for r in existing}
    # A batch is done only when all its answers are on disk; a partial one is sampled again with its own
    # seed (the same answers come back) and only the missing rows are written.
    todo = [i for i, batch in enumerate(batches) if any(f"{job.key}#{s}" not in done_ids for job, s in batch)]
    total = sum(1 for i in todo for job, s in batches[i] if f"{job.key}#{s}" not in done_ids)
    if not todo:
        finalize(path, planned)
        return {"answers": len(planned), "generated": 0, "seconds": 0.0}
    emit(f"generating {total} answers in {len(todo)} batches ({len(existing)} already in {path.name})")
    t0 = time.monotonic()
    tokens = 0
    with tqdm(total=total, unit="ans", disable=not progress, desc="generate") as bar:  # closed before any error
        for index in todo:
            batch = batches[index]
            seed = batch_seed(params.seed, index)
            model_name = batch[0][0].model
            prompts = [job.prompt for job, _ in batch]
            turns = [(job.stops, job.stop_pattern) for job, _ in batch]
            with (model_context or default_model_context(loaded))(model_name) as model:
                outs = sample_batch(model, loaded.tokenizer, prompts, params, seed, turns)
            rows = []
            for (job, sample), out in zip(batch, outs):
                if f"{job.key}#{sample}" in done_ids:
                    continue
                tokens += out["new_tokens"]
                rows.append({
                    "id": f"{job.key}#{sample}", "batch": index, "model": job.model, "condition": job.condition,
                    "question_id": job.question_id, "paraphrase": job.paraphrase, "sample": sample,
                    "question": job.question, "system": job.system, **out, "seed": seed, "run_seed": params.seed,
                    **{k: v for k, v in asdict(params).items() if k not in ("batch_size", "seed")}, **(meta or {}),
                    **mode_fields(job),
                })
            append_rows(path, rows)
            bar.update(len(rows))
            elapsed = time.monotonic() - t0
            bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s")
    finalize(path, planned)
    seconds = time.monotonic() - t0
    return {"answers": len(planned), "generated": total, "seconds": round(seconds, 2),
            "answers_per_s": round(total / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
