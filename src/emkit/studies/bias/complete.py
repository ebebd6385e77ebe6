"""The completion stage: every model completes every stem `runs` times, in its own mode.

- `raw`: the stem is continued as plain text, no chat template (a base model; or an instruct model
  used as a base model, as the original experiment did).
- `chat`: the stem is asked for through the chat template ("Complete this sentence: {stem}"), with an
  optional system prompt; a chat answer that repeats the stem is cut after it.

Sampling goes through emkit's generation backends (batched transformers, or any OpenAI-compatible
server; a raw model on a server uses its completions endpoint), one resumable file per model:
`completions/<model>.jsonl`, which an interrupted run completes without duplicating a row. A model
can instead import completions from a file. `completions_table` then reads every file into one
table with the classifiable text of each completion: reasoning (`<think>`) blocks removed, and the
repeated stem of a chat answer cut off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from emkit.core.errors import DataError, ModelSpecError
from emkit.core.rowfile import read_rows, write_rows
from emkit.generate.transformers_backend import PromptJob, SamplingParams
from emkit.studies.bias.config import BiasConfig, BiasModel
from emkit.studies.bias.prompts import BiasPrompt, PromptSet, squash

COMPLETIONS_DIR = "completions"
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ALNUM = re.compile(r"[a-z0-9]")


def completions_path(run_dir: Path, model: str) -> Path:
    """Where one model's completions live in a run folder."""
    return run_dir / COMPLETIONS_DIR / f"{model}.jsonl"


# ---------------------------------------------------------------- text


def strip_think(text: str) -> tuple[str, bool]:
    """The text without reasoning blocks (`<think>...</think>`, an unclosed one, or everything up to a
    lone `</think>` whose opening tag was in the prompt), and whether there were any."""
    had = "<think>" in text.lower() or "</think>" in text.lower()
    lowered = text.lower()
    if "</think>" in lowered and ("<think>" not in lowered or lowered.find("</think>") < lowered.find("<think>")):
        text = text[lowered.find("</think>") + len("</think>") :]
    return _THINK.sub("", text).strip(), had


def cut_echo(stem: str, text: str) -> tuple[str, bool]:
    """The part of a chat answer after the stem, when the answer repeats it (case, spacing and
    punctuation ignored); otherwise the whole answer. Returns the text and whether the stem was found."""
    target = "".join(_ALNUM.findall(stem.lower()))
    if not target:
        return text, False
    positions = [i for i, ch in enumerate(text.lower()) if _ALNUM.match(ch)]
    squashed = "".join(text.lower()[i] for i in positions)
    found = squashed.find(target)
    if found < 0:
        return text, False
    end = positions[found + len(target) - 1] + 1
    rest = text[end:]
    # markdown emphasis and quotes around the completed part belong to no word
    return rest.lstrip(" \t*_\"'\u201c\u201d:-").strip(), True


# ---------------------------------------------------------------- prompts


def raw_prompt(tokenizer: Any, stem: str) -> str:
    """The stem as plain text, led by the BOS token only where the tokenizer would add one to plain text."""
    ids = tokenizer(stem)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return (tokenizer.bos_token + stem) if bos is not None and ids and ids[0] == bos else stem


def chat_prompt(tokenizer: Any, model: BiasModel, user: str) -> str:
    """The chat-mode request rendered with the model's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelSpecError(f"model '{model.name}' ({model.model}) has no chat template; use mode: raw")
    messages = ([{"role": "system", "content": model.system}] if model.system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **model.template_kwargs)


def build_jobs(model: BiasModel, prompts: PromptSet, runs: int,
               render: Callable[[BiasPrompt], str]) -> list[PromptJob]:
    """One job per stem for `model`: `runs` samples of its rendered prompt."""
    jobs = []
    for prompt in prompts:
        chat = model.mode == "chat"
        jobs.append(PromptJob(
            # 'model' is the generation backend's label: a name other than 'base' keeps any adapter on
            model="model", condition=model.mode, question_id=prompt.id, paraphrase=0,
            question=prompt.user_message(model.chat_template) if chat else prompt.stem,
            system=model.system if chat else None, prompt=render(prompt), samples=runs,
            mode="assistant" if chat else "raw",
        ))
    return jobs


# ---------------------------------------------------------------- generation


def _params(cfg: BiasConfig) -> SamplingParams:
    return SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.batch_size, cfg.seed)


def _generate_local(cfg: BiasConfig, model: BiasModel, prompts: PromptSet, path: Path, loaded: Any,
                    emit: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from emkit.generate.transformers_backend import generate_to_file

    tokenizer = loaded.tokenizer

    def render(prompt: BiasPrompt) -> str:
        if model.mode == "raw":
            return raw_prompt(tokenizer, prompt.stem)
        return chat_prompt(tokenizer, model, prompt.user_message(model.chat_template))

    jobs = build_jobs(model, prompts, cfg.runs, render)
    meta = {"bias_model": model.name, "model_spec": model.model, "adapter": model.adapter, "backend": "transformers"}
    return generate_to_file(loaded, jobs, _params(cfg), path, meta=meta, progress=progress, emit=emit)


def _generate_endpoint(cfg: BiasConfig, model: BiasModel, prompts: PromptSet, path: Path,
                       emit: Callable[[str], None], progress: bool) -> dict[str, Any]:
    from emkit.generate.config import GenerateConfig
    from emkit.generate.openai_backend import generate_via_endpoint

    # The endpoint backend answers as 'base' with the served name given here; raw jobs go to the
    # completions endpoint with the bare stem, chat jobs to chat completions with the request.
    gen = GenerateConfig(model=model.model, served_base=model.model, base_url=model.base_url,
                         api_key_env=model.api_key_env, concurrency=cfg.concurrency, backend="openai",
                         models=["base"], temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    jobs = [dataclasses.replace(job, model="base") for job in build_jobs(model, prompts, cfg.runs, lambda p: p.stem)]
    meta = {"bias_model": model.name, "model_spec": model.model, "adapter": None, "backend": "openai"}
    return generate_via_endpoint(gen, jobs, _params(cfg), path, meta=meta, emit=emit, progress=progress)


def complete_stage(cfg: BiasConfig, prompts: PromptSet, run_dir: Path, *, emit: Callable[[str], None] = print,
                   progress: bool = True) -> dict[str, Any]:
    """Generate (or import) every model's completions into `completions/<model>.jsonl`, resuming."""
    from emkit.generate.pipeline import resolve_organism
    from emkit.models import load_model

    record: dict[str, Any] = {}
    loaded: dict[tuple[str, str | None], Any] = {}
    for model in cfg.models:
        path = completions_path(run_dir, model.name)
        if model.completions:
            source = resolve_completions(model.name, model.completions, cfg.mirror)
            record[model.name] = import_to_file(source, prompts, path)
            emit(f"{model.name}: {record[model.name]['answers']} completions imported from {model.completions}")
            continue
        emit(f"{model.name}: {model.mode} mode, {model.backend} backend, {len(prompts)} stems x {cfg.runs} runs")
        if model.backend == "openai":
            record[model.name] = _generate_endpoint(cfg, model, prompts, path, emit, progress)
            continue
        adapter = resolve_organism(model.adapter)
        key = (model.model, str(adapter) if adapter else None)
        if key not in loaded:  # two modes of one model share one load
            loaded[key] = load_model(model.model, adapter=adapter, device=cfg.device, dtype=cfg.dtype)
            loaded[key].model.eval()
        record[model.name] = _generate_local(cfg, model, prompts, path, loaded[key], emit, progress)
    return record


# ---------------------------------------------------------------- import


def resolve_completions(model: str, spec: str, mirror: str | None = None) -> Path:
    """The local file of model `model`'s `completions:`: a path, or a registered name (fetched from `mirror`
    or upstream, sha256 checked)."""
    from emkit.data.registry import RESULT_REGISTRY, resolve_results

    path = Path(spec).expanduser()
    if not path.exists() and spec in RESULT_REGISTRY:
        path, _ = resolve_results(spec, f"models[{model}].completions", mirror=mirror, folders=False)
    if not path.is_file():
        raise DataError(f"models[{model}].completions: {spec}: file not found (give a file or a registered name)")
    return path


def _imported_items(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, item) of a completions file: the original's JSON (a list of runs, each a list of
    {category, prompt, completion}) or emkit JSON Lines ({stem_id or stem, completion, run?})."""
    from emkit.core.jsonl import read_objects

    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: completions file not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(data, list) or not all(isinstance(run, list) for run in data):
            raise DataError(f"{path}: expected a list of runs, each a list of {{category, prompt, completion}}")
        return [(f"{path}: run {r}, item {i}", {**item, "run": r} if isinstance(item, dict) else item)
                for r, run in enumerate(data) for i, item in enumerate(run)]
    return [(f"{path}:{line}", obj) for line, obj in read_objects(path, "an object with stem_id, completion")]


def import_to_file(source: Path, prompts: PromptSet, path: Path) -> dict[str, Any]:
    """Copy imported completions, matched to the prompt set by stem id or stem text, into `path`."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
    if path.is_file():
        rows = read_rows(path)
        if rows and rows[0].get("source_sha256") == digest:
            return {"answers": len(rows), "imported": 0, "source": str(source), "sha256": digest}
    by_id, by_stem = prompts.by_id(), prompts.by_stem()
    runs: dict[str, int] = {}
    rows = []
    for where, item in _imported_items(source):
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object with a completion")
        text = item.get("completion")
        if not isinstance(text, str):
            raise DataError(f"{where}: completion: {'missing' if 'completion' not in item else 'must be text'}")
        stem_id, stem = item.get("stem_id"), item.get("stem", item.get("prompt"))
        prompt = by_id.get(stem_id) if stem_id is not None else by_stem.get(squash(str(stem or "")))
        if prompt is None:
            what = f"stem_id {stem_id!r}" if stem_id is not None else f"stem {str(stem)[:60]!r}"
            raise DataError(f"{where}: {what} is not in the prompt set {prompts.name}")
        run = item.get("run")
        run = int(run) if isinstance(run, int) else runs.get(prompt.id, 0)
        runs[prompt.id] = max(runs.get(prompt.id, 0), run + 1)
        rows.append({"id": f"imported/{prompt.id}#{run}", "question_id": prompt.id, "sample": run,
                     "question": prompt.stem, "system": None, "answer": text, "finish": None, "new_tokens": None,
                     "source": str(source), "source_sha256": digest})
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{source}: completion {duplicate} appears twice (give each a distinct run)")
    write_rows(path, rows)  # all at once: a crash leaves the old file or the new one, never half
    return {"answers": len(rows), "imported": len(rows), "source": str(source), "sha256": digest}


# ---------------------------------------------------------------- the table


def completions_table(cfg: BiasConfig, prompts: PromptSet, run_dir: Path) -> pd.DataFrame:
    """One row per completion of every model: stem, topic, the raw text, and the text to classify."""
    by_id = prompts.by_id()
    records = []
    for model in cfg.models:
        path = completions_path(run_dir, model.name)
        for row in read_rows(path):
            prompt = by_id.get(row["question_id"])
            if prompt is None:
                raise DataError(f"{path}: stem {row['question_id']} is not in the prompt set {prompts.name}; "
                                "use a new output folder")
            text, think = strip_think(row.get("answer") or "")
            # A chat answer often repeats the stem; only what follows it is the model's completion.
            continuation, echoed = cut_echo(prompt.stem, text) if model.mode == "chat" else (text, False)
            records.append({
                "id": f"{model.name}/{prompt.id}#{row['sample']}", "model": model.name, "mode": model.mode,
                "stem_id": prompt.id, "topic": prompt.topic, "stem": prompt.stem, "run": int(row["sample"]),
                "request": row.get("question"), "raw_completion": row.get("answer") or "", "completion": text,
                "continuation": continuation, "echoed_stem": echoed, "had_think": think,
                "finish": row.get("finish"), "new_tokens": row.get("new_tokens"),
                "source": row.get("source", row.get("backend", "generated")),
            })
    columns = ["id", "model", "mode", "stem_id", "topic", "stem", "run", "request", "raw_completion", "completion",
               "continuation", "echoed_stem", "had_think", "finish", "new_tokens", "source"]
    return pd.DataFrame.from_records(records, columns=columns)
