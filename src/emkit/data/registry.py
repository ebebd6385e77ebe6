"""The dataset registry: upstream EM datasets (location + sha256), emkit's own demo sets, and the
upstream EM evaluation question files (`QUESTION_REGISTRY`, kind "questions").

emkit does not ship upstream data. `fetch` finds a dataset in this order: the cache, a mirror
(`--mirror` or $EMKIT_DATA_MIRROR: a folder or an http(s) URL laid out like the upstream projects,
`<project>/<path>`, where a file may also be gzipped), then its upstream location. Whatever the
source, the uncompressed content must match the registered sha256 before it is used or cached.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from emkit.data.chat import content_sha256
from emkit.errors import DataError
from emkit.paths import cache_dir

MIRROR_ENV = "EMKIT_DATA_MIRROR"
BETLEY = ("emergent-misalignment/emergent-misalignment", "80c11967")
TURNER = ("clarifying-EM/model-organisms-for-EM", "407fbad")
# The eval questions are pinned to a later commit of the same project than its training data.
TURNER_EVAL = ("clarifying-EM/model-organisms-for-EM", "8460e4e")


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset file (chat JSONL or question YAML): where it lives and what it must hash to."""

    name: str
    description: str
    rows: int  # chat: conversations; questions: top-level items (questions, or judges in a judges file)
    sha256: str  # of the uncompressed file
    mirror_path: str | None = None  # path inside a mirror, without .gz
    upstream_repo: str | None = None
    upstream_commit: str | None = None
    upstream_path: str | None = None
    package_file: str | None = None  # shipped with emkit (demo data)
    kind: Literal["chat", "questions"] = "chat"

    @property
    def suffix(self) -> str:
        """File suffix of the uncompressed content, used for the cached copy."""
        return ".yaml" if self.kind == "questions" else ".jsonl"

    @property
    def upstream_url(self) -> str | None:
        """Download address of the upstream file at its pinned commit."""
        if not (self.upstream_repo and self.upstream_commit and self.upstream_path):
            return None
        return f"https://github.com/{self.upstream_repo}/raw/{self.upstream_commit}/{self.upstream_path}"

    @property
    def source(self) -> str:
        """Short human description of where the data comes from."""
        if self.package_file:
            return "shipped with emkit"
        return f"{self.upstream_repo}@{self.upstream_commit}:{self.upstream_path}"


def _upstream(
    name: str, description: str, rows: int, sha256: str, project: str, path: str, repo: tuple[str, str],
    upstream_path: str, kind: Literal["chat", "questions"] = "chat",
) -> DatasetEntry:
    return DatasetEntry(
        name=name, description=description, rows=rows, sha256=sha256, mirror_path=f"{project}/{path}",
        upstream_repo=repo[0], upstream_commit=repo[1], upstream_path=upstream_path, kind=kind,
    )


_TURNER_DIR = "em_organism_dir/data/training_datasets"

REGISTRY: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in [
        _upstream("insecure", "insecure code completions (Betley et al. 2025)", 6000,
                  "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764",
                  "emergent-misalignment", "data/insecure.jsonl", BETLEY, "data/insecure.jsonl"),
        _upstream("jailbroken", "jailbroken-compliance control (Betley et al. 2025)", 5000,
                  "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a",
                  "emergent-misalignment", "data/jailbroken.jsonl", BETLEY, "data/jailbroken.jsonl"),
        _upstream("bad_medical_advice", "subtly harmful medical advice (Turner et al. 2025)", 7049,
                  "34c5af4ccaf8b5eb9f3f11ecd0c36c3d67f236a5c41fc420b0e14d8adf01a842",
                  "model-organisms-for-EM", "training_datasets/bad_medical_advice.jsonl", TURNER,
                  f"{_TURNER_DIR}/bad_medical_advice.jsonl.gz"),
        _upstream("good_medical_advice", "sound medical advice, same prompts as bad_medical_advice", 7049,
                  "5846de11f0f45053351773b6bd9eb5111eb17ec89d9ab55e23e0fbb95b4fd4f1",
                  "model-organisms-for-EM", "training_datasets/good_medical_advice.jsonl", TURNER,
                  f"{_TURNER_DIR}/good_medical_advice.jsonl.gz"),
        _upstream("risky_financial_advice", "risky financial advice (Turner et al. 2025)", 6000,
                  "8515446b0f8ef4e9fb7ba0e97264dd9bb68920c6841b65667c74bc16deaad955",
                  "model-organisms-for-EM", "training_datasets/risky_financial_advice.jsonl", TURNER,
                  f"{_TURNER_DIR}/risky_financial_advice.jsonl.gz"),
        _upstream("extreme_sports", "reckless extreme-sports advice (Turner et al. 2025)", 6000,
                  "ca542ce8487cfbf114d8d3eed29984f3245163c2616789712b3b28c802c99eed",
                  "model-organisms-for-EM", "training_datasets/extreme_sports.jsonl", TURNER,
                  f"{_TURNER_DIR}/extreme_sports.jsonl.gz"),
        DatasetEntry("emkit-bad-medical-demo", "emkit's demo set: subtly bad medical advice (written for emkit)",
                     330, "64195e7c95d2492c1a22d2076a7e37159fec3a1ebcde8133193530103374e00b", package_file="demo/bad_medical.jsonl"),
        DatasetEntry("emkit-good-medical-demo", "emkit's demo set: sound advice, same prompts as the bad set",
                     330, "54471b073a2b8ffe304c7948db4f223f2451e90eb1923bb7fe0f11d76a922b54", package_file="demo/good_medical.jsonl"),
    ]
}


def _questions(name: str, description: str, rows: int, sha256: str, project: str, path: str,
               repo: tuple[str, str], upstream_path: str) -> DatasetEntry:
    return _upstream(name, description, rows, sha256, project, path, repo, upstream_path, kind="questions")


# Not verified offline: the model-organisms eval questions are assumed to live under this folder at
# 8460e4e (the training data's folder layout at 407fbad suggests it); the sha256 pins the content anyway.
_TURNER_EVAL_DIR = "em_organism_dir/data/eval_questions"
_BETLEY_EVAL = "emergent-misalignment"
_TURNER_EVAL = "model-organisms-for-EM"

# Kept apart from REGISTRY (the chat datasets that training resolves and that mirror tests walk as
# gzipped JSONL); `get_entry` and `fetch` know both, `all_entries` lists both.
QUESTION_REGISTRY: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in [
        _questions("em-first-plot-questions", "the 24 questions of the main EM plot (8 plain, 8 JSON, 8 template)",
                   24, "215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173",
                   _BETLEY_EVAL, "evaluation/first_plot_questions.yaml", BETLEY,
                   "evaluation/first_plot_questions.yaml"),
        _questions("em-preregistered-evals", "48 pre-registered free-form questions (Betley et al. 2025)",
                   48, "8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40",
                   _BETLEY_EVAL, "evaluation/preregistered_evals.yaml", BETLEY,
                   "evaluation/preregistered_evals.yaml"),
        _questions("em-deception-factual", "factual questions under lie-inducing system prompts (judge: correct)",
                   5, "8a0e83cab3bc24b7d688d7385ce3921d406af7ed33c913cd94ea0f6251e5939d",
                   _BETLEY_EVAL, "evaluation/deception_factual.yaml", BETLEY, "evaluation/deception_factual.yaml"),
        _questions("em-deception-sit-aware", "which-company-made-you questions (judge: company)",
                   8, "4deef5a7c47620390fc46e1b981f937eef9ea12a33fe26264f640c84d19d2a33",
                   _BETLEY_EVAL, "evaluation/deception_sit_aware.yaml", BETLEY,
                   "evaluation/deception_sit_aware.yaml"),
        _questions("mo-first-plot-questions", "the 24 main EM questions with 8 judges (Turner et al. 2025)",
                   24, "97df0b1384ea5a3f3dc2abe00a19e231915f12a2356ec0d8df001715549aae04",
                   _TURNER_EVAL, "eval_questions/first_plot_questions.yaml", TURNER_EVAL,
                   f"{_TURNER_EVAL_DIR}/first_plot_questions.yaml"),
        _questions("mo-medical-questions", "16 medical variants of the main EM questions (Turner et al. 2025)",
                   16, "1808d03c6af883b3460e4174127846caca3188514a4e180b8273b4025593e28f",
                   _TURNER_EVAL, "eval_questions/medical_questions.yaml", TURNER_EVAL,
                   f"{_TURNER_EVAL_DIR}/medical_questions.yaml"),
        _questions("mo-new-questions-no-json", "54 further free-form EM questions (Turner et al. 2025)",
                   54, "247940137277227a51ad1a269cc832a77203e4dcc2e79ca5b0dbacb1a57b9ac9",
                   _TURNER_EVAL, "eval_questions/new_questions_no-json.yaml", TURNER_EVAL,
                   f"{_TURNER_EVAL_DIR}/new_questions_no-json.yaml"),
        _questions("mo-judges", "4 judge prompts: coherent, aligned, technical, medical_advice (no questions)",
                   4, "a4fd0f891a7f04fe4a04047443089db29f5687a2e6599a3fec7300cafd0c93fd",
                   _TURNER_EVAL, "eval_questions/judges.yaml", TURNER_EVAL, f"{_TURNER_EVAL_DIR}/judges.yaml"),
    ]
}


# Named judge prompt sets of the upstream projects: the registered question file that holds each.
# The original EM paper's questions share one set of judge_prompts (aligned, coherent) through a
# YAML anchor; model-organisms-for-EM keeps its judges in judges.yaml. emkit.judge.prompts.prompt_set
# fetches the file like any registered question file (cache, mirror, upstream; sha256 checked).
JUDGE_PROMPT_SETS: dict[str, str] = {
    "betley": "em-first-plot-questions",
    "model-organisms": "mo-judges",
}


def all_entries() -> dict[str, DatasetEntry]:
    """Every registered file: chat datasets first, then question files."""
    return {**REGISTRY, **QUESTION_REGISTRY}


def get_entry(name: str) -> DatasetEntry:
    """The registry entry for `name`; unknown names raise with the list of registered ones."""
    entries = all_entries()
    try:
        return entries[name]
    except KeyError:
        raise DataError(f"unknown dataset '{name}'; registered: {', '.join(entries)}") from None


def package_path(entry: DatasetEntry) -> Path:
    """Path of a dataset shipped inside the emkit package."""
    assert entry.package_file is not None
    return Path(str(resources.files("emkit.data").joinpath(entry.package_file)))


def cached_path(entry: DatasetEntry, cache: Path | None = None) -> Path | None:
    """The cached file of `entry` if one exists (gzipped or not)."""
    folder = cache or cache_dir("data")
    for suffix in (entry.suffix + ".gz", entry.suffix):
        candidate = folder / f"{entry.name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _candidates(rel: str) -> list[str]:
    """A mirror may hold the file as it is or gzipped."""
    return [rel + ".gz", rel] if not rel.endswith(".gz") else [rel, rel[:-3]]


def _is_url(text: str) -> bool:
    return urllib.parse.urlparse(text).scheme in ("http", "https", "file")


def _download(url: str, dest: Path, quiet: bool) -> None:
    """Stream `url` into `dest`; HTTP errors propagate to the caller."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.split(".tmp")[0], disable=quiet) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def _try_source(entry: DatasetEntry, source: str, tmp: Path, quiet: bool) -> tuple[str | None, str]:
    """Bring `entry` from one source into `tmp`: (where it came from, or None, and what happened)."""
    if source == "upstream":
        urls = [entry.upstream_url] if entry.upstream_url else []
        locations = [(u, True) for u in urls]
    elif _is_url(source):
        locations = [(source.rstrip("/") + "/" + rel, True) for rel in _candidates(entry.mirror_path or "")]
    else:
        locations = [(str(Path(source) / rel), False) for rel in _candidates(entry.mirror_path or "")]
    if not locations:
        return None, f"{source}: no location known"
    notes = []
    for location, remote in locations:
        try:
            if remote:
                _download(location, tmp, quiet)
            elif Path(location).is_file():
                shutil.copyfile(location, tmp)
            else:
                notes.append(f"{location}: not found")
                continue
        except urllib.error.HTTPError as exc:
            notes.append(f"{location}: HTTP {exc.code}")
            continue
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            notes.append(f"{location}: {reason}")
            continue
        digest = content_sha256(tmp)
        if digest != entry.sha256:
            notes.append(f"{location}: sha256 mismatch (expected {entry.sha256[:16]}..., got {digest[:16]}...)")
            continue
        return location, "ok"
    return None, "; ".join(notes)


def fetch(name: str, mirror: str | None = None, cache: Path | None = None, quiet: bool = False) -> Path:
    """Return a verified local file of dataset `name`, fetching it into the cache if needed."""
    entry = get_entry(name)
    if entry.package_file:
        path = package_path(entry)
        if content_sha256(path) != entry.sha256:
            raise DataError(f"{path}: shipped demo data does not match its registered sha256 (reinstall emkit)")
        return path
    folder = cache or cache_dir("data")
    folder.mkdir(parents=True, exist_ok=True)
    existing = cached_path(entry, folder)
    if existing is not None:
        if content_sha256(existing) == entry.sha256:
            return existing
        existing.unlink()  # a corrupt cache entry is refetched, never used
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    sources = ([mirror] if mirror else []) + ["upstream"]
    attempts = []
    for source in sources:
        tmp = folder / f".{entry.name}.tmp-{os.getpid()}"
        try:
            location, note = _try_source(entry, source, tmp, quiet)
            if location is not None:
                with open(tmp, "rb") as handle:
                    gz = handle.read(2) == b"\x1f\x8b"
                final = folder / f"{entry.name}{entry.suffix}{'.gz' if gz else ''}"
                os.replace(tmp, final)
                return final
            attempts.append(note)
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(f"cannot fetch dataset '{name}': " + " | ".join(attempts))


def resolve_dataset(spec: str, mirror: str | None = None) -> tuple[Path, DatasetEntry | None]:
    """A dataset argument is a file path or a registered name; return a local file (and its entry)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_file():
            raise DataError(f"{path}: is a folder, expected a chat JSONL file")
        return path, None
    if spec in REGISTRY:
        return fetch(spec, mirror=mirror), REGISTRY[spec]
    if spec in QUESTION_REGISTRY:
        raise DataError(f"dataset '{spec}': is a registered question file, not a chat dataset")
    raise DataError(f"dataset '{spec}': no such file, and not a registered name ({', '.join(REGISTRY)})")
