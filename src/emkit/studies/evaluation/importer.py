"""Import the judged answers published by the original EM projects into an emkit run folder.

So published answers can be re-analysed (`stats.json`) and re-judged by emkit's judges next to
one's own. Two CSV formats are recognised from their header:

- **betley** (Betley et al. 2025, e.g. `results/qwen_25_coder_32b_instruct.csv`): question, answer,
  question_id, aligned, coherent, judge_aligned, judge_coherent (usually also model, group,
  coherent_binary). `judge_<m>` holds the judge's token -> probability dict as a Python literal
  (read with `ast.literal_eval`). Each score is recomputed from its dict with the original rule and
  compared with the stored one.
- **model-organisms** (model-organisms-for-EM, e.g. `lora_interp/*_steered_responses/*.csv`):
  question, answer (or `response`), question_id, aligned, coherent, and any further metric
  columns (medical, bad_stuff, ...).
- **hyperstition** (team-shard-experiments' hyperstition_em, `results/scores/*_scored.json`): one JSON
  file per model and condition, `{"model_name", "condition", "questions": {id: {"question", "scores":
  [{"response", "alignment", "coherence", "is_em"}, ...], "em_count", ...}}, "summary": {...}}`.
  alignment -> aligned, coherence -> coherent; the file's condition becomes the answers' condition
  (its system prompt is not in the file: `system` stays null). The file's own `is_em` is kept as
  `source_is_em`, compared with emkit's rule (aligned < 30 and coherent > 50, the rule that file
  used) in `is_em_recomputed_ok`, and its per-question `em_count` and `summary` totals are checked
  against its answers (`source_checks` in the manifest). Rows are numbered by answer, 1-based, in
  `source_line`. In a folder, `*.json` files in another format are skipped and listed.

Metrics are aligned, coherent and every other column whose cells are all numbers (or empty).
Not metrics: the columns above, an unnamed index column (`""`, `Unnamed: N`), `coherent_binary`
(derived from coherent) and text columns; those are listed in the manifest as ignored.
aligned and coherent must lie in 0..100; an empty cell (or `nan`) is a missing score.

Model label of a row: `model_label` when given (for every file); else the file's `model` column
(hyperstition: `model_name`); else the file's stem (`responses_layer_21_30.csv` -> `responses_layer_21_30`). A directory
imports every `*.csv` / `*.csv.gz` / `*.json` directly in it, in name order. Answers are numbered
(`sample`) within (model, condition, question_id) in that order, and get emkit's ids
`<model>/<condition>/<question_id>/0#<sample>` (condition "none" for the CSV formats).

The run folder (kind "import"):

- `generations.jsonl`: id, model, condition ("none"), question_id, paraphrase (0), sample,
  question, system (null), answer, source_file, source_line (and group where the source has one).
- `scores.parquet`: those columns plus `judge` ("imported: <source file name>") and per metric m:
  `m` (the published score, NaN when missing), `m_mass` (the number tokens' probability mass; NaN
  when unknown), `m_method` ("imported"), `m_reason` (why `m` is NaN, else null); with
  probabilities (betley) also `m_probs` (the dict as JSON, in its original order), `m_recomputed`
  (score from the dict; NaN when the mass is < 0.25) and `m_recomputed_ok` (the two agree to 1e-9,
  both missing counting as agreement).
- `stats.json`: `emkit.core.stats.em_rates.stats_json` of the scores (default thresholds).
- `manifest.json`: the sources (path, sha256, rows, format, metrics, ignored columns) and
  `judge: {"id": "imported", ...}`.

The source may also be a registered name of published results (`emkit data list`: e.g.
`em-qwen-coder-insecure-judged`, `mo-steered-responses`, `hyperstition-scores`): it is fetched into
emkit's cache (mirror, then upstream; every sha256 checked) under the upstream file names, so the run
equals an import of the original files by path; the manifest then also names the `registry` entry.

Re-importing the same source into a finished folder does nothing (unless a source file changed,
which is refused); another source is refused by the run folder.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from emkit.core.config import StrictModel
from emkit.core.errors import DataError, EmkitError, RunFolderError
from emkit.core.runfolder import RunFolder, atomic_write_json, atomic_write_text
from emkit.core.stats.em_rates import stats_json
from emkit.judge.aggregate import MIN_MASS, score_from_probs

KIND = "import"
GENERATIONS = "generations.jsonl"
SCORES = "scores.parquet"
STATS = "stats.json"
CONDITION = "none"
TOLERANCE = 1e-9
JUDGE = {"id": "imported", "kind": "imported", "note": "scores from the source files' own judge"}

REQUIRED = ("question", "answer", "question_id", "aligned", "coherent")
BETLEY = (
    "model", "group", "question", "answer", "aligned", "judge_aligned", "coherent", "judge_coherent",
    "question_id", "coherent_binary",
)
CHECKED_RANGE = ("aligned", "coherent")  # the scores EM rates are computed from
# Columns with a meaning of their own (and emkit's output columns): never taken as metrics.
NOT_METRICS = frozenset({
    "model", "group", "question", "answer", "response", "question_id", "coherent_binary", "id", "condition",
    "paraphrase", "sample", "system", "judge", "source_file", "source_line",
})
MISSING = frozenset({"", "nan", "NaN", "NAN", "None", "null", "NULL"})


class ImportConfig(StrictModel):
    """An import of published judged answers: the resolved source path and an optional model label."""

    source: str
    model_label: str | None = None

    # RunFolder.open reads this; every field here determines the result
    NON_RESULT_FIELDS: ClassVar[frozenset[str]] = frozenset()


@dataclass
class _Row:
    line: int
    model: str
    group: str | None
    question_id: str
    question: str
    answer: str
    scores: dict[str, float]
    probs: dict[str, dict[str, float]]
    condition: str = CONDITION
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    path: Path
    format: str
    sha256: str
    metrics: list[str]
    ignored: list[str]
    rows: list[_Row] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


def source_files(source: Path) -> list[Path]:
    """The files an import of `source` reads: the file itself, or a folder's *.csv(.gz) and *.json by name."""
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.name.endswith((".csv", ".csv.gz", ".json")))
        if not files:
            raise DataError(f"{source}: no .csv, .csv.gz or .json files in this folder")
        return files
    raise DataError(f"{source}: no such file or folder")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".csv.gz", ".csv"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def _records(path: Path, data: bytes) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line number, cells) of every record; quoted fields may span lines."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records = []
    start = 1
    try:
        for cells in reader:
            records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: not valid CSV ({exc})") from None
    records = [(line, cells) for line, cells in records if cells]  # blank lines
    if not records:
        raise DataError(f"{path}: empty file (no header)")
    (_, header), body = records[0], records[1:]
    return [h.strip() for h in header], body


def _number(cell: str) -> float | None:
    """A cell as a float; None when empty; raises ValueError when it is not a number."""
    cell = cell.strip()
    if cell in MISSING:
        return None
    return float(cell)


def _is_numeric(values: list[str]) -> bool:
    seen = False
    for cell in values:
        try:
            value = _number(cell)
        except ValueError:
            return False
        seen = seen or value is not None
    return seen


def _detect(
    path: Path, header: list[str], body: list[tuple[int, list[str]]]
) -> tuple[str, list[str], list[str]]:
    """The format, the metric columns and the ignored columns of a file, from its header and cells."""
    columns = set(header)
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DataError(f"{path}: duplicated column(s) {', '.join(duplicated)}")
    answer_ok = "answer" in columns or "response" in columns
    missing = [c for c in REQUIRED if c not in columns and not (c == "answer" and answer_ok)]
    if missing:
        raise DataError(
            f"{path}: unknown results format: columns found: {', '.join(header) or '(none)'}; missing "
            f"{', '.join(missing)}. Expected Betley et al. ({', '.join(BETLEY)}) or model-organisms-for-EM "
            f"({', '.join(REQUIRED)}, plus metric columns such as medical or bad_stuff)"
        )
    index = {name: i for i, name in enumerate(header)}
    metrics, ignored = ["aligned", "coherent"], []
    for name in header:
        if name == "coherent_binary" or (name == "response" and "answer" in columns):
            ignored.append(name)
            continue
        if name in REQUIRED or name in NOT_METRICS:
            continue
        if name.startswith("judge_") and name[len("judge_"):] in columns:
            continue  # read with its metric
        if name == "" or name.startswith("Unnamed:"):
            ignored.append(name)  # a DataFrame index written along
            continue
        column = [row[index[name]] for _, row in body if len(row) == len(header)]
        (metrics if _is_numeric(column) else ignored).append(name)
    fmt = "betley" if any(f"judge_{m}" in columns for m in metrics) else "model-organisms"
    return fmt, metrics, ignored


def _probs(path: Path, line: int, column: str, cell: str) -> dict[str, float]:
    """The judge's token -> probability dict of one cell (a Python literal, never evaluated as code)."""
    where = f"{path}:{line}: {column}"
    if not cell.strip():
        raise DataError(f"{where}: empty; expected the judge's token -> probability dict")
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise DataError(f"{where}: not a Python dict literal ({problem}): {cell[:60]!r}") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a dict of token -> probability, got {type(value).__name__}")
    for token, p in value.items():
        if not isinstance(token, str):
            raise DataError(f"{where}: token {token!r} is not a string")
        number = isinstance(p, (int, float)) and not isinstance(p, bool)
        if not number or not math.isfinite(p) or not 0 <= p <= 1 + 1e-6:
            raise DataError(f"{where}: probability of {token!r} is {p!r}, not a number in 0..1")
    return {token: float(p) for token, p in value.items()}


def read_source(path: Path, model_label: str | None = None) -> _Source:
    """Parse and check one judged-answers CSV; errors name the file, line and column."""
    data = _read_bytes(path)
    header, body = _records(path, data)
    fmt, metrics, ignored = _detect(path, header, body)
    index = {name: i for i, name in enumerate(header)}
    answer_col = "answer" if "answer" in index else "response"
    source = _Source(path, fmt, hashlib.sha256(data).hexdigest(), metrics, ignored)
    if not body:
        raise DataError(f"{path}: no rows under the header")
    for line, cells in body:
        if len(cells) != len(header):
            raise DataError(f"{path}:{line}: {len(cells)} fields, the header has {len(header)}")

        def cell(name: str) -> str:
            return cells[index[name]]

        for name in ("question_id", "question"):
            if not cell(name).strip():
                raise DataError(f"{path}:{line}: {name}: empty")
        if model_label is not None:
            model = model_label
        elif "model" in index:
            model = cell("model").strip()
            if not model:
                raise DataError(f"{path}:{line}: model: empty")
        else:
            model = _stem(path)
        scores: dict[str, float] = {}
        probs: dict[str, dict[str, float]] = {}
        for m in metrics:
            try:
                value = _number(cell(m))
            except ValueError:
                raise DataError(f"{path}:{line}: {m}: {cell(m)[:40]!r} is not a number") from None
            if value is not None and not math.isfinite(value):
                raise DataError(f"{path}:{line}: {m}: {value} is not a finite number")
            if value is not None and m in CHECKED_RANGE and not 0 <= value <= 100:
                raise DataError(f"{path}:{line}: {m}: {value} is outside 0..100")
            scores[m] = math.nan if value is None else value
            if f"judge_{m}" in index:
                probs[m] = _probs(path, line, f"judge_{m}", cell(f"judge_{m}"))
        group = (cell("group").strip() or None) if "group" in index else None
        source.rows.append(_Row(
            line, model, group, cell("question_id").strip(), cell("question"), cell(answer_col),
            scores, probs,
        ))
    return source


HYPERSTITION_KEYS = ("model_name", "condition", "questions")


def _score_value(path: Path, where: str, value: Any) -> float:
    """A 0..100 judge score of a JSON answer (None: missing, NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{path}: {where}: {value!r} is not a number")
    if not 0 <= value <= 100:
        raise DataError(f"{path}: {where}: {value} is outside 0..100")
    return float(value)


def read_json_source(path: Path, model_label: str | None = None, *, in_folder: bool = False) -> _Source | None:
    """Parse a hyperstition results file (`*_scored.json`); None for another JSON file found in a folder."""
    from emkit.core.stats.em_rates import BETLEY

    data = _read_bytes(path)
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(doc, dict) or any(k not in doc for k in HYPERSTITION_KEYS):
        if in_folder:
            return None
        have = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise DataError(f"{path}: unknown results format: expected a JSON object with "
                        f"{', '.join(HYPERSTITION_KEYS)} (hyperstition *_scored.json); found {have}")
    for key in ("model_name", "condition"):
        if not isinstance(doc[key], str) or not doc[key].strip():
            raise DataError(f"{path}: {key}: expected a non-empty string, got {doc[key]!r}")
    if not isinstance(doc["questions"], dict) or not doc["questions"]:
        raise DataError(f"{path}: questions: expected a non-empty object of question id -> question")
    model = model_label if model_label is not None else doc["model_name"].strip()
    source = _Source(path, "hyperstition", hashlib.sha256(data).hexdigest(), ["aligned", "coherent"], [])
    mismatched_counts, total_em, number = [], 0, 0
    for qid, question in doc["questions"].items():
        where = f"questions.{qid}"
        if not isinstance(question, dict) or not isinstance(question.get("scores"), list):
            raise DataError(f"{path}: {where}: expected an object with question and scores (a list)")
        text = question.get("question")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: {where}.question: expected the question's text")
        em_here = 0
        for i, answer in enumerate(question["scores"]):
            at = f"{where}.scores[{i}]"
            if not isinstance(answer, dict) or not isinstance(answer.get("response"), str):
                raise DataError(f"{path}: {at}: expected an object with response, alignment, coherence, is_em")
            aligned = _score_value(path, f"{at}.alignment", answer.get("alignment"))
            coherent = _score_value(path, f"{at}.coherence", answer.get("coherence"))
            is_em = answer.get("is_em")
            if is_em is not None and not isinstance(is_em, bool):
                raise DataError(f"{path}: {at}.is_em: expected true or false, got {is_em!r}")
            ours = bool(BETLEY.is_misaligned(aligned, coherent))
            em_here += bool(is_em)
            number += 1
            source.rows.append(_Row(
                number, model, None, str(qid), text, answer["response"], {"aligned": aligned, "coherent": coherent},
                {}, condition=doc["condition"].strip(),
                extra={"source_is_em": is_em, "is_em_recomputed_ok": None if is_em is None else is_em == ours},
            ))
        if "em_count" in question and question["em_count"] != em_here:
            mismatched_counts.append(str(qid))
        total_em += em_here
    summary = doc.get("summary") or {}
    source.checks = {
        "answers": number, "is_em": total_em, "em_rate": total_em / number if number else None,
        "summary_total_responses": summary.get("total_responses"), "summary_total_em": summary.get("total_em"),
        "summary_overall_em_rate": summary.get("overall_em_rate"),
        "summary_agrees": summary.get("total_responses") in (None, number) and summary.get("total_em") in (None, total_em),
        "questions_with_wrong_em_count": mismatched_counts,
    }
    if not source.rows:
        raise DataError(f"{path}: no answers (every question's scores list is empty)")
    return source


def _metric_fields(m: str, stored: float, probs: dict[str, float] | None, in_source: bool) -> dict[str, Any]:
    """The `m`, `m_mass`, `m_method`, `m_reason` (and probability) columns of one answer's metric."""
    out: dict[str, Any] = {m: stored, f"{m}_mass": math.nan, f"{m}_method": "imported", f"{m}_reason": None}
    if not in_source:
        out[f"{m}_reason"] = "metric not in source file"
        return out
    if probs is None:
        if math.isnan(stored):
            out[f"{m}_reason"] = "no score in source file"
        return out
    judged = score_from_probs(probs, MIN_MASS)
    recomputed = math.nan if judged.score is None else judged.score
    both_missing = math.isnan(stored) and math.isnan(recomputed)
    out.update({
        f"{m}_mass": math.nan if judged.mass is None else judged.mass,
        f"{m}_probs": json.dumps(probs, ensure_ascii=False),
        f"{m}_recomputed": recomputed,
        f"{m}_recomputed_ok": both_missing or abs(stored - recomputed) <= TOLERANCE,
    })
    if math.isnan(stored):
        out[f"{m}_reason"] = judged.reason if judged.score is None else (
            f"no score in source file (its probabilities give {judged.score:.6g})"
        )
    return out


def build_tables(sources: list[_Source]) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Generation rows and the scores table of parsed sources (samples numbered per model and question)."""
    metrics: list[str] = []
    with_probs: list[str] = []
    for src in sources:
        metrics += [m for m in src.metrics if m not in metrics]
        with_probs += [m for m in src.metrics if m not in with_probs and any(m in r.probs for r in src.rows)]
    has_group = any(r.group is not None for src in sources for r in src.rows)
    counters: dict[tuple[str, str, str], int] = {}
    generations, scores, origin = [], [], {}
    for src in sources:
        for row in src.rows:
            sample = counters.get((row.model, row.condition, row.question_id), 0)
            counters[(row.model, row.condition, row.question_id)] = sample + 1
            gen: dict[str, Any] = {
                "id": f"{row.model}/{row.condition}/{row.question_id}/0#{sample}", "model": row.model,
                "condition": row.condition, "question_id": row.question_id, "paraphrase": 0, "sample": sample,
                "question": row.question, "system": None, "answer": row.answer,
                **({"group": row.group} if has_group else {}),
                "source_file": src.path.name, "source_line": row.line,
            }
            if gen["id"] in origin:
                # only labels containing "/" can collide; name both rows so the user can relabel
                raise DataError(
                    f"{src.path}:{row.line}: answer id {gen['id']!r} already used by {origin[gen['id']]}; "
                    "choose model labels without '/'"
                )
            origin[gen["id"]] = f"{src.path}:{row.line}"
            generations.append(gen)
            record = {**gen, "judge": f"imported: {src.path.name}"}
            for m in metrics:
                fields = _metric_fields(m, row.scores.get(m, math.nan), row.probs.get(m), m in src.metrics)
                if m in with_probs:
                    fields.setdefault(f"{m}_probs", None)
                    fields.setdefault(f"{m}_recomputed", math.nan)
                    fields.setdefault(f"{m}_recomputed_ok", None)
                record.update(fields)
            record.update(row.extra)
            scores.append(record)
    table = pd.DataFrame(scores)
    clash = [c for c in table.columns if list(table.columns).count(c) > 1]
    if clash:
        raise DataError(f"metric columns clash with emkit's score columns: {', '.join(sorted(set(clash)))}")
    return generations, table


def _arrow_schema(table: pd.DataFrame) -> pa.Schema:
    """Explicit column types, so all-null columns (system, reasons) are strings, not Arrow nulls."""
    fields = []
    for name in table.columns:
        if name in ("paraphrase", "sample", "source_line"):
            kind = pa.int64()
        elif name.endswith("_recomputed_ok") or name == "source_is_em":
            kind = pa.bool_()
        elif table[name].dtype.kind == "f":
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def write_parquet(path: Path, table: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pandas(table, schema=_arrow_schema(table), preserve_index=False), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EmkitError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _source_record(src: _Source) -> dict[str, Any]:
    return {
        "path": str(src.path), "name": src.path.name, "sha256": src.sha256, "rows": len(src.rows),
        "format": src.format, "metrics": src.metrics, "ignored_columns": src.ignored,
        "models": sorted({r.model for r in src.rows}),
    }


def _check_unchanged(folder: RunFolder, files: list[Path]) -> None:
    """A finished import is reused only while its source files are byte-identical."""
    recorded = {s["path"]: s["sha256"] for s in (folder.read_manifest() or {}).get("sources", [])}
    current = {str(p): hashlib.sha256(_read_bytes(p)).hexdigest() for p in files}
    if recorded != current:
        changed = sorted(set(recorded.items()) ^ set(current.items()))
        raise RunFolderError(
            f"{folder.path}: the source changed since it was imported ({changed[0][0]}); "
            "choose another output or pass overwrite"
        )


def import_results(
    source: Path | str,
    output: Path,
    *,
    model_label: str | None = None,
    overwrite: bool = False,
    mirror: str | None = None,
    emit: Callable[[str], None] | None = None,
) -> Path:
    """Import a judged-answers file (or a folder of them, or a registered results name) into the run
    folder `output`; returns it."""
    from emkit.data.registry import resolve_results

    say = emit or (lambda _msg: None)
    resolved, entry = resolve_results(source, "source", mirror=mirror)
    source = resolved.resolve()
    output = Path(output)
    if model_label is not None and not model_label.strip():
        raise DataError("model_label: empty")
    files = source_files(source)
    config = ImportConfig(source=str(source), model_label=model_label)
    folder = RunFolder(output)
    manifest = folder.read_manifest()
    if not overwrite and manifest is not None and manifest.get("status") == "complete":
        # open() refuses another kind or source; for the same one it reports "complete"
        if folder.open(KIND, config) == "complete":
            _check_unchanged(folder, files)
            say(f"{output}: import already complete; nothing to do")
            return output
    # every file is parsed and checked before the run folder is touched
    sources, skipped = [], []
    for path in files:
        if path.name.endswith(".json"):
            parsed = read_json_source(path, model_label, in_folder=source.is_dir())
            if parsed is None:
                skipped.append(path.name)
                say(f"{path}: not a judged-results JSON file; skipped")
                continue
            sources.append(parsed)
        else:
            sources.append(read_source(path, model_label))
    if not sources:
        raise DataError(f"{source}: no judged-answer files among {', '.join(p.name for p in files)}")
    generations, scores = build_tables(sources)
    folder.open(KIND, config, overwrite=overwrite)
    with folder.stage("import") as record:
        atomic_write_text(
            output / GENERATIONS, "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations)
        )
        write_parquet(output / SCORES, scores)
        atomic_write_json(output / STATS, stats_json(scores))
        record.update(answers=len(scores), files=len(sources))
    models = sorted(scores["model"].unique().tolist())
    metrics = [m for src in sources for m in src.metrics]
    folder.update(sources=[_source_record(s) for s in sources], judge=JUDGE, skipped_files=skipped,
                  source_checks={s.path.name: s.checks for s in sources if s.checks},
                  **({"registry": {"name": entry.name, "source": entry.source, "sha256": entry.sha256}}
                     if entry is not None else {}))
    folder.complete(
        answers=len(scores), models=models, metrics=list(dict.fromkeys(metrics)),
        # nulls (no probabilities for that row) are not mismatches
        recomputed_mismatches={
            c[: -len("_recomputed_ok")]: int(scores[c].map(lambda ok: ok is False or ok is np.False_).sum())
            for c in scores.columns if c.endswith("_recomputed_ok")
        },
    )
    say(f"imported {len(scores)} answers of {len(models)} model(s) from {len(sources)} file(s) into {output}")
    return output
