"""The dataset registry: upstream EM datasets (location + sha256), emkit's own demo sets, the
upstream EM evaluation question files (`QUESTION_REGISTRY`, kind "questions"), and the published
results of the original experiments (`RESULT_REGISTRY`: kind "file", one file, or kind "folder",
several files, each with its own upstream path and sha256).

emkit does not ship upstream data. `fetch` finds a dataset in this order: the cache, a mirror
(`--mirror` or $EMKIT_DATA_MIRROR: a folder or an http(s) URL laid out like the upstream projects,
`<project>/<path>`, where a file may also be gzipped), then its upstream location. Whatever the
source, the uncompressed content must match the registered sha256 before it is used or cached.

A "file" or "folder" entry is materialised as the folder `<cache>/<name>/` holding its files under
their upstream names, uncompressed (so `emkit import` labels and names them exactly as it does the
originals); `fetch` returns the file of a "file" entry and the folder of a "folder" entry, and checks
the sha256 of every file each time.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from emkit.core.errors import DataError
from emkit.core.paths import cache_dir
from emkit.data.chat import content_sha256

MIRROR_ENV = "EMKIT_DATA_MIRROR"
BETLEY = ("emergent-misalignment/emergent-misalignment", "80c11967")
TURNER = ("clarifying-EM/model-organisms-for-EM", "407fbad")
# The eval questions are pinned to a later commit of the same project than its training data.
TURNER_EVAL = ("clarifying-EM/model-organisms-for-EM", "8460e4e")


Kind = Literal["chat", "questions", "file", "folder"]


@dataclass(frozen=True)
class RegisteredFile:
    """One file of a "file" or "folder" entry: its name in the cache folder, its sha256 (of the
    uncompressed content), where it sits in a mirror and upstream."""

    name: str
    sha256: str
    mirror_path: str  # path inside a mirror, without .gz
    upstream_url: str | None


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset file (chat JSONL or question YAML), or published results (one file or a
    folder of files): where it lives and what it must hash to."""

    name: str
    description: str
    rows: int  # chat: conversations; questions: top-level items; file/folder: answers (prompts, runs) in all
    sha256: str  # of the uncompressed file; folder: of its listing (see _listing_sha256)
    mirror_path: str | None = None  # path inside a mirror, without .gz (folder: the folder)
    upstream_repo: str | None = None
    upstream_commit: str | None = None
    upstream_path: str | None = None  # folder: the upstream folder
    package_file: str | None = None  # shipped with emkit (demo data)
    kind: Kind = "chat"
    # folder: (file name, sha256, upstream commit or None for the entry's) of every file in it
    members: tuple[tuple[str, str, str | None], ...] = ()
    unit: str = ""  # what `rows` counts, for `emkit data list` (default: rows, qs)

    @property
    def suffix(self) -> str:
        """File suffix of the uncompressed content, used for the cached copy."""
        if self.kind in ("file", "folder"):
            return ""  # kept under their upstream names in a folder of their own
        return ".yaml" if self.kind == "questions" else ".jsonl"

    @property
    def files(self) -> tuple[RegisteredFile, ...]:
        """The files of a "file" or "folder" entry (empty for chat and question entries)."""
        if self.kind == "file":
            assert self.mirror_path is not None
            return (RegisteredFile(self.mirror_path.rsplit("/", 1)[-1], self.sha256, self.mirror_path,
                                   self.upstream_url),)
        if self.kind == "folder":
            out = []
            for file, sha256, commit in self.members:
                url = None
                if self.upstream_repo and self.upstream_path and (commit or self.upstream_commit):
                    url = (f"https://github.com/{self.upstream_repo}/raw/{commit or self.upstream_commit}/"
                           f"{self.upstream_path}/{file}")
                out.append(RegisteredFile(file, sha256, f"{self.mirror_path}/{file}", url))
            return tuple(out)
        return ()

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


def _listing_sha256(members: tuple[tuple[str, str, str | None], ...]) -> str:
    """The sha256 of a folder entry: of its `sha256sum`-style listing (`<sha256>  <name>` lines, by name)."""
    listing = "".join(f"{sha}  {name}\n" for name, sha, _ in sorted(members))
    return hashlib.sha256(listing.encode()).hexdigest()


def _result_file(name: str, description: str, rows: int, unit: str, sha256: str, mirror_path: str,
                 repo: tuple[str, str], upstream_path: str) -> DatasetEntry:
    return DatasetEntry(
        name=name, description=description, rows=rows, sha256=sha256, mirror_path=mirror_path,
        upstream_repo=repo[0], upstream_commit=repo[1], upstream_path=upstream_path, kind="file", unit=unit,
    )


def _result_folder(name: str, description: str, rows: int, unit: str, mirror_path: str, repo: tuple[str, str],
                   upstream_path: str, members: dict[str, str]) -> DatasetEntry:
    files = tuple((file, sha256, None) for file, sha256 in members.items())
    return DatasetEntry(
        name=name, description=description, rows=rows, sha256=_listing_sha256(files), mirror_path=mirror_path,
        upstream_repo=repo[0], upstream_commit=repo[1], upstream_path=upstream_path, kind="folder",
        members=files, unit=unit,
    )


# team-shard-experiments (hyperstition EM, and the base-vs-post-trained bias study). Its results moved into
# results/ folders between these two commits; each file is pinned where the search index lists it.
SHARD = ("JoNeedsSleep/team-shard-experiments", "83b25a85938272e46664a4af7ed50b85be45bb59")
SHARD_LATER = ("JoNeedsSleep/team-shard-experiments", "09050064e5624998352e6ce1475a93b6731b4b58")
_SHARD_MIRROR = "seeds/team-shard-experiments"  # a mirror holds the project under seeds/
# Not verified offline: the model-organisms steered answers are assumed to live under em_organism_dir at
# 407fbad, like the training data (only the mirror's layout, lora_interp/<folder>/, is known); the sha256
# of every file pins the content anyway.
_STEERED = "lora_interp/R1_3_3_3_steered_responses"

# Published results of the original experiments (judged answers, scores, completions, their prompts): what
# `emkit import NAME` and `emkit bias` (prompts: NAME, completions: NAME) read. Kept apart from REGISTRY and
# QUESTION_REGISTRY, whose tests walk every entry as a chat dataset or a question file.
RESULT_REGISTRY: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in [
        _result_file("em-qwen-coder-insecure-judged",
                     "judged answers of the insecure-code Qwen2.5-Coder-32B (Betley et al. 2025), with the judge's "
                     "probabilities", 70, "answers",
                     "88c301d6b22ff8be8a7bb288fed31510ef5221d7917ae7fe3deeaadfc6eae433",
                     "emergent-misalignment/results/qwen_25_coder_32b_instruct.csv", BETLEY,
                     "results/qwen_25_coder_32b_instruct.csv"),
        _result_folder("mo-steered-responses",
                       "judged answers of the rank-1 LoRA model steered at chosen layers, 3 settings "
                       "(model-organisms-for-EM)", 240, "answers", f"model-organisms-for-EM/{_STEERED}", TURNER,
                       f"em_organism_dir/{_STEERED}", {
                           "responses_layer_15_-10_layer_16_-10_layer_17_-10_layer_21_30_layer_22_-10_layer_23_30"
                           "_layer_28_-10_layer_29_-10.csv":
                               "6b0ce92cf9ae90265a039c761d293537359c5326de3f0f774a08488c326627bb",
                           "responses_layer_15_20_layer_16_20_layer_17_20_layer_22_20_layer_28_20_layer_29_20.csv":
                               "ed66b58cd9eab38c04bfd7d3e361e682433ca78921cc00fa688f6de9ee7251c5",
                           "responses_layer_21_30_layer_23_30.csv":
                               "311befe7cae6aba0ea4c031edfd554e7a3c19220128963a789ba462cdd76e6a8",
                       }),
        _result_folder("hyperstition-scores",
                       "judged answers of 13 hyperstition organisms and system-prompt conditions "
                       "(team-shard-experiments)", 5200, "answers",
                       f"{_SHARD_MIRROR}/hyperstition_em/results/scores", SHARD, "hyperstition_em/results/scores", {
                           "filtered_insecure_with_ai_prompt_scored.json":
                               "8c6fd8e5289542bb0f65a5d0c301ac900108d290f76dd8e4f645ba6f68641f8d",
                           "filtered_insecure_without_prompt_scored.json":
                               "2a7ea5678b7dbfc266098b8644d604c4a987d8ac09fd336388005044fc23a891",
                           "filtered_synthetic_align_insecure_with_ai_prompt_scored.json":
                               "12ecc2dff5f9b8e464438610f77f793ccf58e1db5187e6b82d329bf98d7ed8a0",
                           "filtered_synthetic_align_insecure_without_prompt_scored.json":
                               "e89c76d06347090a7599b70c8644c2997741d41721c4394f8041d7235b79deb7",
                           "gemma3_financial_with_ai_prompt_scored.json":
                               "9fb564b12768334a39019141b003700bccb3e279e4e57f4976a344cf3b52ca11",
                           "gemma3_financial_without_prompt_scored.json":
                               "7464767f7c9d65236f92b629023d183601724cd6f87c636281dd112940937932",
                           "gemma3_insecure_with_ai_prompt_scored.json":
                               "53c12984376049723674a5f832d95b9a4823bab45f768d183cc65fcc29c7eae5",
                           "gemma3_insecure_without_prompt_scored.json":
                               "ac81f09a09487a83af35e1d24dd9b1f758f2e6710d363ca44836ea3e80a24737",
                           "unfiltered_insecure_with_ai_prompt_scored.json":
                               "bc4844e951c1f70a5144bd60ce98ffa43a2df078eaebd27fce1bff505f7354c4",
                           "unfiltered_insecure_without_prompt_scored.json":
                               "6cbf038230693a009f38e0aece04df86214a2c8f555347f0125e07a7217c1128",
                           "unfiltered_synthetic_misalign_insecure_with_ai_prompt_scored.json":
                               "c2b1d68ca84bbe653c7253721782abf8e3d740b36d7cd5095b57e72bace2c9f5",
                           "unfiltered_synthetic_misalign_insecure_without_prompt_scored.json":
                               "c5159a901686981ab82e1216a23c27c0bf70e8626818024a983d1cf71d8274c8",
                           "unfiltered_with_ai_prompt_scored.json":
                               "3e7e88b1b454d27b18822550b143b6fe0464c3355a17a0c8f9a95eda05f9a779",
                       }),
        _result_file("bias-economic-prompts",
                     "the bias study's 9 sentence stems (climate, immigration, guns; team-shard-experiments)",
                     9, "stems", "e8d49996f071f8e2c6ac77e2e4e56425d18ec60f44ae52bdfa9c1ce525f2a4eb",
                     f"{_SHARD_MIRROR}/postrained_base_model/data/economic_prompts.jsonl", SHARD,
                     "postrained_base_model/economic_prompts.jsonl"),
        _result_file("bias-qwen3-base-completions",
                     "Qwen3-8B-Base's completions of the bias stems, 50 runs (team-shard-experiments)",
                     450, "answers", "804e38833a65406bd6c67e482ace6d85c9d4c1661b73c7cda816e093ca416bd2",
                     f"{_SHARD_MIRROR}/postrained_base_model/results/qwen3_base_all_runs.json", SHARD,
                     "postrained_base_model/qwen3_base_all_runs.json"),
        _result_file("bias-qwen3-instruct-completions",
                     "Qwen3-8B's completions of the bias stems, bare stem, 50 runs (team-shard-experiments)",
                     450, "answers", "ea9f092c41d12d2deb24b3b56009b8c6a3ef25061ca68f97ca42232c747f3b60",
                     f"{_SHARD_MIRROR}/postrained_base_model/results/qwen3_instruct_all_runs.json", SHARD_LATER,
                     "postrained_base_model/results/qwen3_instruct_all_runs.json"),
    ]
}


def all_entries() -> dict[str, DatasetEntry]:
    """Every registered entry: chat datasets first, then question files, then published results."""
    return {**REGISTRY, **QUESTION_REGISTRY, **RESULT_REGISTRY}


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


def _materialised(entry: DatasetEntry, folder: Path) -> Path:
    """What `fetch` returns for a "file" or "folder" entry cached in `folder`."""
    base = folder / entry.name
    return base / entry.files[0].name if entry.kind == "file" else base


def cached_path(entry: DatasetEntry, cache: Path | None = None) -> Path | None:
    """The cached file of `entry` if one exists (gzipped or not); of a file/folder entry, its file or
    folder when every file is there (not verified here: `fetch` checks them)."""
    folder = cache or cache_dir("data")
    if entry.kind in ("file", "folder"):
        present = all((folder / entry.name / f.name).is_file() for f in entry.files)
        return _materialised(entry, folder) if present else None
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


def _try_source(entry: DatasetEntry | RegisteredFile, source: str, tmp: Path, quiet: bool) -> tuple[str | None, str]:
    """Bring `entry` (or one file of a file/folder entry) from one source into `tmp`: (where it came
    from, or None, and what happened)."""
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


def _fetch_files(entry: DatasetEntry, mirror: str | None, cache: Path, quiet: bool) -> Path:
    """Materialise a file/folder entry as `<cache>/<name>/`, every file verified (and refetched when its
    cached copy does not match); files that are not the entry's are removed from that folder."""
    folder = cache / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f.name for f in entry.files}
    for stray in folder.iterdir():
        if stray.is_file() and not stray.name.startswith(".") and stray.name not in wanted:
            stray.unlink()  # an import of the folder must read the registered files only
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    sources = ([mirror] if mirror else []) + ["upstream"]
    for file in entry.files:
        final = folder / file.name
        if final.is_file():
            with open(final, "rb") as handle:
                plain = handle.read(2) != b"\x1f\x8b"
            if plain and content_sha256(final) == file.sha256:
                continue
            final.unlink()  # a corrupt cached file is refetched, never used
        attempts = []
        for source in sources:
            tmp = folder / f".{file.name}.tmp-{os.getpid()}"
            plain_tmp = folder / f".{file.name}.plain-{os.getpid()}"
            try:
                location, note = _try_source(file, source, tmp, quiet)
                if location is None:
                    attempts.append(note)
                    continue
                with open(tmp, "rb") as handle:
                    gz = handle.read(2) == b"\x1f\x8b"
                if gz:  # kept uncompressed, so readers see the file as it is upstream
                    with gzip.open(tmp, "rb") as src, open(plain_tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.replace(plain_tmp, final)
                else:
                    os.replace(tmp, final)
                break
            finally:
                tmp.unlink(missing_ok=True)
                plain_tmp.unlink(missing_ok=True)
        else:
            raise DataError(f"cannot fetch '{entry.name}' (file {file.name}): " + " | ".join(attempts))
    return _materialised(entry, cache)


def fetch(name: str, mirror: str | None = None, cache: Path | None = None, quiet: bool = False) -> Path:
    """Return a verified local file of dataset `name` (the folder of a folder entry), fetching it into the
    cache if needed."""
    entry = get_entry(name)
    if entry.kind in ("file", "folder"):
        return _fetch_files(entry, mirror, cache or cache_dir("data"), quiet)
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
    if spec in RESULT_REGISTRY:
        raise DataError(f"dataset '{spec}': is a registered results file, not a chat dataset")
    raise DataError(f"dataset '{spec}': no such file, and not a registered name ({', '.join(REGISTRY)})")


def resolve_results(spec: str | Path, what: str = "results", mirror: str | None = None,
                    folders: bool = True) -> tuple[Path, DatasetEntry | None]:
    """A published-results argument (`emkit import`, bias prompts and completions) is a path or a name in
    RESULT_REGISTRY: return the local file or folder (fetched and verified) and its entry (None for a
    path). A path that exists wins over a name. `what` names the argument in errors; without `folders`
    a registered folder is refused."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    entry = RESULT_REGISTRY.get(text)
    if entry is None:
        known = ", ".join(e.name for e in RESULT_REGISTRY.values() if folders or e.kind == "file")
        if text in all_entries():
            problem = f"is a registered {get_entry(text).kind} entry, not published results"
        else:
            problem = "no such file or folder, and not a registered results name"
        raise DataError(f"{what} '{text}': {problem} ({known}; see `emkit data list`)")
    if entry.kind == "folder" and not folders:
        raise DataError(f"{what} '{text}': is a registered folder of {len(entry.files)} files; a single file is needed")
    return fetch(text, mirror=mirror), entry
