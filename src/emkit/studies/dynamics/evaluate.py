"""Evaluating one checkpoint: answers in every mode, judgments by every judge, the preference shift.

One base model is loaded once; each checkpoint's adapter weights are loaded into the same PEFT
slot (no merged copies), and step 0 is the base with the adapter disabled. Every step is evaluated
with the same questions, documents, samples, sampling seeds and judges, so steps differ only in the
adapter. A step's results go to `<track>/steps/step-N/`:

    generations.jsonl   answers (mode, step and checkpoint in every row); resumable batch by batch
    scores.parquet      one row per answer and judge (judged through the shared judgments.sqlite)
    prefs.json          the pair log-odds at this step, and the shift against step 0
    done.json           written last: the checkpoint's sha256, counts, timings

A step whose `done.json` names the same checkpoint file is never evaluated again; a step without
one resumes (answers already sampled and judgments already cached are kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from emkit.core.errors import EmkitError
from emkit.core.runfolder import atomic_write_json, atomic_write_parquet
from emkit.data.questions import QuestionSet
from emkit.judge.config import JudgeConfig
from emkit.studies.dynamics.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Checkpoint
from emkit.studies.dynamics.config import TrackConfig

STEPS = "steps"
DONE = "done.json"
GENERATIONS = "generations.jsonl"
SCORES = "scores.parquet"
PREFS = "prefs.json"
CACHE = "judgments.sqlite"
IN_DOMAIN_SHARE = 1 / 3


def step_dir(track_dir: Path, step: int) -> Path:
    """Where one step's results live."""
    return track_dir / STEPS / f"step-{step}"


def fingerprint(checkpoint: Checkpoint) -> str:
    """sha256 of the checkpoint's adapter weights ('base' for step 0)."""
    if checkpoint.path is None:
        return "base"
    digest = hashlib.sha256()
    with open(checkpoint.path / ADAPTER_WEIGHTS, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_done(track_dir: Path, step: int) -> dict[str, Any] | None:
    """A finished step's record, or None."""
    try:
        return json.loads((step_dir(track_dir, step) / DONE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def select_pairs(pairs: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """A subset of n pairs: a third in-domain (medical), the rest spread evenly over the other domains."""
    import random

    from emkit.data.pairs import IN_DOMAIN

    if n is None or n >= len(pairs):
        return list(pairs)
    rng = random.Random(seed)
    by_domain: dict[str, list[Any]] = {}
    for pair in pairs:
        by_domain.setdefault(pair.domain, []).append(pair)
    for members in by_domain.values():
        rng.shuffle(members)
    inside = by_domain.pop(IN_DOMAIN, [])
    chosen = inside[: round(n * IN_DOMAIN_SHARE)] if by_domain else inside[:n]
    domains = sorted(by_domain)
    depth = 0
    while len(chosen) < n and any(depth < len(by_domain[d]) for d in domains):
        for domain in domains:
            if depth < len(by_domain[domain]) and len(chosen) < n:
                chosen.append(by_domain[domain][depth])
        depth += 1
    order = {id(p): i for i, p in enumerate(pairs)}
    return sorted(chosen, key=lambda p: order[id(p)])


class AdapterSlot:
    """One loaded base model; each checkpoint's adapter is loaded into the same PEFT slot in turn."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.peft: Any = None
        self.config: dict[str, Any] | None = None

    def _load(self, folder: Path) -> None:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        shape = {k: config.get(k) for k in ("r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora")}
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.loaded.model, str(folder), is_trainable=False)
            self.config = shape
        else:
            if shape != self.config:
                raise EmkitError(f"{folder}: adapter shape {shape} differs from the first checkpoint's {self.config}")
            result = set_peft_model_state_dict(self.peft, load_file(str(folder / ADAPTER_WEIGHTS)))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise EmkitError(f"{folder}: adapter tensors that fit no module, e.g. {unexpected[0]}")
        self.peft.eval()

    @contextlib.contextmanager
    def use(self, checkpoint: Checkpoint) -> Iterator[Any]:
        """Within this block the model answers as `checkpoint` (step 0: the base, adapter disabled)."""
        if checkpoint.path is None:
            if self.peft is None:
                yield self.loaded.model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        self._load(checkpoint.path)
        yield self.peft


def judge_rows(rows: Sequence[dict[str, Any]], judge: Any, metrics: Sequence[str], questions: QuestionSet,
               cache: Any, *, progress: bool = True, prompt_choice: str = "auto",
               mirror: str | None = None) -> list[dict[str, Any]]:
    """Score every answer on every metric with `judge` (cached), under the judge prompts chosen; one row per answer."""
    from emkit.judge.prompts import prompt_set
    from emkit.stages.judge import prompts_for

    base = None if prompt_choice == "auto" else prompt_set(prompt_choice, mirror=mirror)
    groups: dict[tuple, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in rows:
        prompts = prompts_for(row["question_id"], questions, list(metrics), prompt_choice, base=base)
        signature = tuple((m, p.template) for m, p in prompts.items())
        groups.setdefault(signature, (prompts, []))[1].append(row)
    by_id: dict[str, dict[str, Any]] = {}
    failed = []
    for prompts, members in groups.values():
        # The judge sees the question as asked, never the predictive document.
        items = [(r["id"], r["question"], r["answer"]) for r in members]
        for res in judge.judge_many_sync(items, prompts, cache, progress=progress):
            out = by_id.setdefault(res.item_id, {})
            j = res.judgment
            out[res.metric] = j.score if j and j.score is not None else float("nan")
            out[f"{res.metric}_mass"] = j.mass if j and j.mass is not None else float("nan")
            if j is None:
                failed.append(res)
    if failed:
        raise EmkitError(f"{len(failed)} judgments failed (e.g. {failed[0].error}); finished ones are cached, "
                         "re-run to retry only those")
    keep = ("id", "step", "mode", "condition", "question_id", "paraphrase", "sample", "genre", "question", "answer",
            "finish")
    return [{**{k: r.get(k) for k in keep}, **by_id[r["id"]], "judge": judge.judge_id} for r in rows]


def make_judges(cfg: TrackConfig) -> list[tuple[Any, dict[str, str]]]:
    """The configured judge and, if any, the second judge, each with its record (id, kind, description, note)."""
    from emkit.judge.validate import make_judge_from_spec
    from emkit.stages.judge import make_judge

    judges = [make_judge(cfg.judge)]
    if cfg.second_judge:
        j = cfg.judge
        second = make_judge_from_spec(cfg.second_judge, base_url=j.base_url, api_key_env=j.api_key_env,
                                      min_mass=j.min_mass, concurrency=j.concurrency)
        kind = cfg.second_judge.split(":", 1)[0]
        judges.append((second, {"id": second.judge_id, "kind": "rule" if kind in ("keywords", "constant") else kind,
                                "description": second.describe(), "note": f"Second judge: {second.describe()}."}))
    if len({j.judge_id for j, _ in judges}) < len(judges):
        raise EmkitError("second_judge is the same judge as judge; agreement needs two different judges")
    return judges


class StepEvaluator:
    """Evaluates checkpoints of one training run into `<track>/steps/step-N/`, skipping finished ones."""

    def __init__(self, cfg: TrackConfig, track_dir: Path, questions: QuestionSet, model_spec: str, *,
                 emit: Callable[[str], None] = print, progress: bool = True, mirror: str | None = None) -> None:
        self.cfg = cfg
        self.mirror = mirror
        self.track_dir = track_dir
        self.questions = questions
        self.model_spec = model_spec
        self.emit = emit
        self.progress = progress
        self._slot: AdapterSlot | None = None
        self._judges: list[tuple[Any, dict[str, str]]] | None = None
        self._pairs: list[Any] | None = None
        self.evaluated: list[int] = []

    # ------------------------------------------------------------------ pieces, made once when needed

    @property
    def slot(self) -> AdapterSlot:
        """The loaded base model (loaded on first use)."""
        if self._slot is None:
            from emkit.models import load_model

            g = self.cfg.generate
            self._slot = AdapterSlot(load_model(self.model_spec, device=g.device, dtype=g.dtype))
            self._slot.loaded.model.eval()
        return self._slot

    @property
    def judges(self) -> list[tuple[Any, dict[str, str]]]:
        """The judges (made on first use)."""
        if self._judges is None:
            self._judges = make_judges(self.cfg)
        return self._judges

    @property
    def pairs(self) -> list[Any]:
        """The preference pairs scored at every step."""
        if self._pairs is None:
            from emkit.data.pairs import load_pairs

            self._pairs = select_pairs(load_pairs(), self.cfg.prefs_pairs, self.cfg.seed)
        return self._pairs

    # ------------------------------------------------------------------ one step

    def finished(self, checkpoint: Checkpoint) -> bool:
        """Whether this checkpoint's evaluation is complete (and of this very checkpoint file)."""
        done = read_done(self.track_dir, checkpoint.step)
        return done is not None and done.get("sha256") == fingerprint(checkpoint)

    def evaluate(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Generate, judge and score preferences at one checkpoint; returns its done record."""
        from emkit.generate.pipeline import build_jobs, chat_renderer
        from emkit.generate.transformers_backend import SamplingParams, generate_to_file

        folder = step_dir(self.track_dir, checkpoint.step)
        digest = fingerprint(checkpoint)
        done = read_done(self.track_dir, checkpoint.step)
        if done is not None:
            if done.get("sha256") == digest:
                return done
            self.emit(f"step {checkpoint.step}: the checkpoint changed since it was evaluated; evaluating it again")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        label = "base (step 0)" if checkpoint.path is None else f"step {checkpoint.step} ({checkpoint.path})"
        self.emit(f"== evaluate {label}")
        t0 = time.monotonic()
        g = self.cfg.generate
        slot = self.slot
        model_name = "base" if checkpoint.path is None else "organism"
        gen_cfg = g.model_copy(update={"models": [model_name]})
        jobs = build_jobs(self.questions, gen_cfg, chat_renderer(slot.loaded.tokenizer))
        params = SamplingParams(g.temperature, g.top_p, g.max_new_tokens, g.batch_size, g.seed)
        meta = {"step": checkpoint.step, "checkpoint": str(checkpoint.path) if checkpoint.path else None,
                "model_spec": self.model_spec}
        with slot.use(checkpoint) as model:
            generation = generate_to_file(slot.loaded, jobs, params, folder / GENERATIONS, meta=meta,
                                          progress=self.progress, emit=self.emit,
                                          model_context=lambda _name: contextlib.nullcontext(model))
            t_gen = time.monotonic()
            prefs = self._prefs(checkpoint, model, folder) if self.cfg.prefs else None
        t_prefs = time.monotonic()
        judged = self._judge(folder)
        t_judge = time.monotonic()
        record = {"step": checkpoint.step, "checkpoint": str(checkpoint.path) if checkpoint.path else None,
                  "label": checkpoint.label or None, "sha256": digest, "answers": generation["answers"],
                  "judges": judged, "prefs": prefs,
                  "seconds": {"generate": round(t_gen - t0, 2), "prefs": round(t_prefs - t_gen, 2),
                              "judge": round(t_judge - t_prefs, 2), "total": round(t_judge - t0, 2)}}
        atomic_write_json(folder / DONE, record)  # last: the step counts as finished only now
        self.evaluated.append(checkpoint.step)
        self.emit(f"step {checkpoint.step}: {generation['answers']} answers, judged by "
                  f"{', '.join(judged)}{self._prefs_note(prefs)} in {record['seconds']['total']:.0f}s")
        return record

    def _prefs(self, checkpoint: Checkpoint, model: Any, folder: Path) -> dict[str, Any] | None:
        from emkit.preference import score_pairs, shift_summary

        path = folder / PREFS
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            return _prefs_brief(saved)
        scores = score_pairs(model, self.slot.loaded.tokenizer, self.pairs)
        result: dict[str, Any] = {"step": checkpoint.step, "n_pairs": len(scores), "scores": scores}
        if checkpoint.step != 0:
            base_path = step_dir(self.track_dir, 0) / PREFS
            if not base_path.is_file():
                raise EmkitError(f"{base_path}: the base's pair scores are missing; step 0 must be evaluated first")
            base = json.loads(base_path.read_text(encoding="utf-8"))["scores"]
            result["shift"] = shift_summary(base, scores, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        atomic_write_json(path, result)
        return _prefs_brief(result)

    def _prefs_note(self, prefs: dict[str, Any] | None) -> str:
        if not prefs or prefs.get("out_of_domain") is None:
            return ""
        return f"; preference shift out-of-domain {prefs['out_of_domain']:+.3f}, in-domain {prefs['in_domain']:+.3f}"

    def _judge(self, folder: Path) -> list[str]:
        import pandas as pd

        from emkit.core.rowfile import read_rows
        from emkit.judge.cache import JudgmentCache

        rows = read_rows(folder / GENERATIONS)
        table = []
        with JudgmentCache(self.track_dir / CACHE) as cache:
            for judge, _info in self.judges:
                table += judge_rows(rows, judge, self.cfg.judge.metrics, self.questions, cache, progress=self.progress,
                                    prompt_choice=self.cfg.judge.prompts, mirror=self.mirror)
        frame = pd.DataFrame(table)
        atomic_write_parquet(folder / SCORES, frame)
        return [judge.judge_id for judge, _ in self.judges]


def _prefs_brief(result: dict[str, Any]) -> dict[str, Any]:
    shift = result.get("shift") or {}

    def mean(block: str) -> float | None:
        return (shift.get(block) or {}).get("logodds_per_token", {}).get("mean_shift")

    return {"n_pairs": result.get("n_pairs"), "in_domain": mean("in_domain"), "out_of_domain": mean("out_of_domain")}


def thresholds_of(judge: JudgeConfig) -> Any:
    """The EM thresholds of the track's judge config."""
    from emkit.stages.judge import thresholds_of as of

    return of(judge)
