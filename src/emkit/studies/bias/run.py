"""`emkit bias CONFIG`: complete, classify, compare, report; every stage resumable.

    runs/<name>/
      config.yaml, manifest.json   the config; stages, timings, classifiers, versions
      completions/<model>.jsonl    each model's completions (resumed batch by batch, never duplicated)
      judgments.sqlite             the LLM classifier's cache (a re-run asks nothing twice)
      labels.parquet               one row per completion: text, keyword label and cues, LLM label and p
      bias_stats.json              distributions, intervals, tests, per-topic and per-stem shifts, agreement
      report.html, figures/        the report

Each stage reads the previous stage's files: generation skips finished batches, the keyword
classifier is recomputed (it is instantaneous), the LLM classifier skips cached judgments, and the
statistics and the report are recomputed from `labels.parquet`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from emkit.core.errors import DataError, EmkitError
from emkit.core.runfolder import RunFolder, atomic_write_json, atomic_write_parquet
from emkit.studies.bias.complete import complete_stage, completions_table, resolve_completions
from emkit.studies.bias.config import BiasConfig
from emkit.studies.bias.keywords import KeywordClassifier, Lexicon, load_lexicons
from emkit.studies.bias.prompts import PromptSet, load_prompt_set
from emkit.studies.bias.report import LABELS_FILE, STATS, headline, load_stats

CACHE = "judgments.sqlite"


def check_inputs(cfg: BiasConfig) -> tuple[PromptSet, Lexicon | None]:
    """Load the prompts and lexicons and check models, imports and the classifier prompt, before any
    folder is written; every problem is a one-line error."""
    from emkit.generate.pipeline import resolve_organism
    from emkit.models import parse_spec
    from emkit.studies.bias.llm_classifier import load_template

    prompts = load_prompt_set(cfg.prompts, mirror=cfg.mirror).filter(cfg.topics, cfg.include)
    lexicon = None
    if "keywords" in cfg.classifiers:
        lexicon = load_lexicons(cfg.keywords.lexicons)
        missing = [t for t in prompts.topics if not lexicon.covers(t)]
        if missing:
            raise DataError(f"no lexicon for topic(s) {', '.join(missing)} (lexicons: {', '.join(lexicon.sources)}; "
                            "add a topic file, or run only the llm classifier)")
    for model in cfg.models:
        if model.completions:
            resolve_completions(model.name, model.completions, cfg.mirror)
        elif model.backend == "transformers":
            parse_spec(model.model)
            resolve_organism(model.adapter)
    if "llm" in cfg.classifiers:
        load_template(cfg.llm.template)
    return prompts, lexicon


def classify_keywords(table: pd.DataFrame, classifier: KeywordClassifier) -> pd.DataFrame:
    """Keyword label, reason and fired cues (per side, and in full) of every row's continuation."""
    rows = []
    for r in table.itertuples():
        decision = classifier.classify(r.continuation, r.topic, r.stem_id)
        rows.append({
            "id": r.id, "keywords_label": decision.label, "keywords_reason": decision.reason,
            "keywords_progressive_cues": decision.cues("progressive"),
            "keywords_conservative_cues": decision.cues("conservative"),
            "keywords_hits": json.dumps([{"cue": h.cue, "side": h.side, "matched": h.matched, "negated": h.negated,
                                          "counts_for": h.counts_for, "source": h.source} for h in decision.hits]),
        })
    return pd.DataFrame.from_records(rows, columns=["id", "keywords_label", "keywords_reason",
                                                    "keywords_progressive_cues", "keywords_conservative_cues",
                                                    "keywords_hits"])


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically (temporary file, then rename)."""
    atomic_write_parquet(path, frame)


def classify_stage(cfg: BiasConfig, table: pd.DataFrame, lexicon: Lexicon | None, run_dir: Path, *,
                   emit: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Label every completion with each classifier into `labels.parquet`; returns the classifiers' records."""
    labels = table
    info: dict[str, Any] = {}
    if lexicon is not None:
        keywords = KeywordClassifier(lexicon, cfg.keywords.off_topic_filter, cfg.keywords.scope)
        labels = labels.merge(classify_keywords(table, keywords), on="id", how="left")
        info["keywords"] = {"id": keywords.classifier_id, "lexicons": lexicon.sources, "digest": lexicon.digest,
                            "off_topic_filter": cfg.keywords.off_topic_filter, "scope": cfg.keywords.scope}
    failed = 0
    if "llm" in cfg.classifiers:
        from emkit.judge.cache import JudgmentCache
        from emkit.studies.bias.llm_classifier import classify_llm, load_template, make_classifier

        judge, judge_info = make_classifier(cfg.llm)
        emit(judge_info["note"])
        with JudgmentCache(run_dir / CACHE) as cache:
            llm = classify_llm(table, judge, cache, load_template(cfg.llm.template), min_mass=cfg.llm.min_mass,
                               progress=progress)
        labels = labels.merge(llm, on="id", how="left")
        failed = int((labels["llm_method"] == "error").sum())
        info["llm"] = {**judge_info, "min_mass": cfg.llm.min_mass, "template": cfg.llm.template or "emkit",
                       "cached": int(labels["llm_cached"].sum()), "errors": failed}
    write_parquet(labels, run_dir / LABELS_FILE)
    if failed:
        example = labels.loc[labels["llm_method"] == "error", "llm_reason"].iloc[0]
        raise EmkitError(f"{failed} LLM classifications failed (e.g. {example}); labels so far are saved and cached; "
                         "re-run to retry only those")
    return info


def run_bias(cfg: BiasConfig, *, overwrite: bool = False, emit: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage of `cfg` in its run folder; returns the run path, statistics and report path."""
    from emkit.studies.bias.compare import bias_stats
    from emkit.studies.bias.report import write_bias_report

    run = RunFolder(cfg.output)
    if not overwrite and run.open("bias", cfg, main_process=False) == "complete":
        emit(f"{cfg.output}: already complete (same config); nothing to do")
        report = run.path / "report.html"
        return {"run": run.path, "stats": load_stats(run.path), "report": report if report.is_file() else None}
    prompts, lexicon = check_inputs(cfg)
    run.open("bias", cfg, overwrite=overwrite)
    sources = [f"{m.name} ({m.mode}, {'imported' if m.completions else f'{cfg.runs} per stem'})" for m in cfg.models]
    emit(f"== complete: {len(prompts)} stems over {len(prompts.topics)} topics; models {', '.join(sources)}")
    with run.stage("complete") as record:
        record.update(complete_stage(cfg, prompts, run.path, emit=emit, progress=progress))
    table = completions_table(cfg, prompts, run.path)
    emit(f"== classify {len(table)} completions: {', '.join(cfg.classifiers)}")
    with run.stage("classify") as record:
        record.update(classify_stage(cfg, table, lexicon, run.path, emit=emit, progress=progress))
    run.update(classifiers=record)
    emit("== compare")
    with run.stage("compare") as record:
        labels = pd.read_parquet(run.path / LABELS_FILE)
        stats = bias_stats(labels, cfg.classifiers, [m.name for m in cfg.models], cfg.reference_model,
                           n_boot=cfg.n_boot, n_perm=cfg.permutations, seed=cfg.seed, ci=cfg.ci)
        stats["classifier_info"] = (run.read_manifest() or {}).get("classifiers", {})
        atomic_write_json(run.path / STATS, stats)
        record.update(completions=len(labels), tests=len(stats["tests"]))
    report = None
    if cfg.report:
        emit("== report")
        with run.stage("report") as record:
            report = write_bias_report(run.path, examples=cfg.examples)
            record.update(path=str(report))
    run.complete(report=str(report) if report else None, stats=STATS)
    emit(headline(stats))
    return {"run": run.path, "stats": stats, "report": report}
