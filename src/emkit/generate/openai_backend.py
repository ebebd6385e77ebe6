"""Generation on any OpenAI-compatible server (vLLM, SGLang, llama.cpp): async, bounded concurrency.

Base and organism are two served model names, e.g. with vLLM
`vllm serve BASE --enable-lora --lora-modules em=ADAPTER --max-lora-rank 64`: `served_base: BASE`,
`served_organism: em`. Each answer is a request with its own seed, derived from the run seed and
the answer's id, and is appended to `generations.jsonl` as soon as it arrives, so an interrupted
run resumes with the answers still missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emkit.core.endpoint import EndpointError, make_client, with_retries
from emkit.core.errors import EmkitError
from emkit.core.rowfile import append_rows, finalize, resume_rows
from emkit.generate.config import GenerateConfig
from emkit.generate.modes import cut_turn
from emkit.generate.transformers_backend import PromptJob, SamplingParams, mode_fields


def answer_seed(seed: int, answer_id: str) -> int:
    """Per-answer seed: the same answer gets the same seed whatever ran before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{answer_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def served_names(cfg: GenerateConfig) -> dict[str, str]:
    """Served model name per emkit model label."""
    names = {"base": cfg.served_base or cfg.model}
    if "organism" in cfg.models:
        if not cfg.served_organism:
            raise EmkitError("the openai backend needs served_organism (e.g. the vLLM LoRA module name) "
                             "to answer as the organism")
        names["organism"] = cfg.served_organism
    return names


async def _run(cfg: GenerateConfig, items: list[tuple[PromptJob, int]], params: SamplingParams, path: Path,
               meta: dict[str, Any], bar: Any) -> int:
    client = make_client(cfg.base_url, cfg.api_key_env)
    names = served_names(cfg)
    gate = asyncio.Semaphore(cfg.concurrency)
    tokens = 0

    async def one(job: PromptJob, sample: int) -> None:
        nonlocal tokens
        answer_id = f"{job.key}#{sample}"
        messages = ([{"role": "system", "content": job.system}] if job.system else []) + [
            {"role": "user", "content": job.question}
        ]
        seed = answer_seed(params.seed, answer_id)
        sampling = {"model": names[job.model], "temperature": params.temperature, "top_p": params.top_p,
                    "max_tokens": params.max_new_tokens, "seed": seed}
        if job.mode == "assistant":
            def request() -> Any:
                return client.chat.completions.create(messages=messages, **sampling)
        else:
            # Template-free modes need the plain completions endpoint; the API takes at most four stop
            # strings, the rest are applied to the text below.
            def request() -> Any:
                return client.completions.create(prompt=job.prompt, stop=list(job.stops[:4]) or None, **sampling)
        async with gate:
            reply, attempts = await with_retries(
                request, what=f"generation endpoint {cfg.base_url or 'OpenAI'} ({names[job.model]})",
                api_key_env=cfg.api_key_env,
            )
        choice = reply.choices[0] if reply.choices else None
        text = (getattr(choice, "text", None) if job.mode != "assistant"
                else (choice.message.content if choice is not None and choice.message is not None else None))
        if choice is None or text is None:
            raise EndpointError(f"generation endpoint {cfg.base_url}: reply without a message for {answer_id}")
        used = getattr(reply.usage, "completion_tokens", None)
        tokens += used or 0
        finish = "length" if choice.finish_reason == "length" else "stop"
        extra: dict[str, Any] = {}
        if job.stops or job.stop_pattern:
            kept, cut = cut_turn(text, job.stops, job.stop_pattern)
            # The server drops a stop string it stopped at; vLLM names it in `stop_reason`.
            matched = isinstance(getattr(choice, "stop_reason", None), str)
            finish = "turn_end" if cut or matched else finish
            extra["completion"], text = text, kept
        append_rows(path, [{
            "id": answer_id, "batch": None, "model": job.model, "condition": job.condition,
            "question_id": job.question_id, "paraphrase": job.paraphrase, "sample": sample,
            "question": job.question, "system": job.system, "answer": text.strip(),
            "new_tokens": used, "finish": finish, **extra, "seed": seed,
            "run_seed": params.seed,
            **{k: v for k, v in asdict(params).items() if k not in ("batch_size", "seed")},
            "served_model": names[job.model], "attempts": attempts, **meta, **mode_fields(job),
        }])
        bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for job, sample in items:
                group.create_task(one(job, sample))
    except* EmkitError as eg:
        raise eg.exceptions[0] from None
    finally:
        await client.close()
    return tokens


def generate_via_endpoint(cfg: GenerateConfig, jobs: Sequence[PromptJob], params: SamplingParams, path: Path, *,
                          meta: dict[str, Any] | None = None, emit: Callable[[str], None] = print,
                          progress: bool = True) -> dict[str, Any]:
    """Sample every missing answer from the endpoint into `path`; returns counts and throughput."""
    from tqdm import tqdm

    planned = {f"{job.key}#{s}": (job, s) for job in jobs for s in range(job.samples)}
    existing = resume_rows(path, planned, emit)
    done = {r["id"] for r in existing}
    items = [item for key, item in planned.items() if key not in done]
    if not items:
        finalize(path, list(planned))
        return {"answers": len(planned), "generated": 0, "seconds": 0.0}
    emit(f"generating {len(items)} answers on {cfg.base_url or 'the OpenAI API'} "
         f"({cfg.concurrency} in flight; {len(existing)} already in {path.name})")
    t0 = time.monotonic()
    with tqdm(total=len(items), unit="ans", disable=not progress, desc="generate") as bar:
        tokens = asyncio.run(_run(cfg, items, params, path, {**(meta or {}), "backend": "openai"}, bar))
    finalize(path, list(planned))  # answers arrive in any order; the file ends in plan order
    seconds = time.monotonic() - t0
    return {"answers": len(planned), "generated": len(items), "seconds": round(seconds, 2),
            "answers_per_s": round(len(items) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
