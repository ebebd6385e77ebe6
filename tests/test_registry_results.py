"""Published results in the registry (kinds "file" and "folder"): every file's sha256 against the shared data
mirror, fetching a file or a folder (folder and HTTP mirrors, gzipped mirror copies, the cache), corrupted
copies refused, and the commands that take a registered name: `emkit import NAME` (the same run as an
import by path) and `emkit bias` with `prompts:` / `completions:` names (examples/bias-original.yaml)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import shutil
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

from emkit.core.errors import DataError
from emkit.data import registry
from emkit.data.chat import content_sha256
from emkit.data.registry import (
    QUESTION_REGISTRY,
    REGISTRY,
    RESULT_REGISTRY,
    all_entries,
    cached_path,
    fetch,
    get_entry,
    resolve_results,
)
from emkit.studies.bias.config import BiasConfig
from emkit.studies.evaluation.importer import import_results

ROOT = Path(__file__).resolve().parents[1]
IMPORTABLE = ["em-qwen-coder-insecure-judged", "mo-steered-responses", "hyperstition-scores"]
BIAS = ["bias-economic-prompts", "bias-qwen3-base-completions", "bias-qwen3-instruct-completions"]


@pytest.fixture(autouse=True)
def _offline_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach the real upstream: a test about a mirror must not pass (or fail) through the network."""
    download = registry._download

    def only_local(url: str, dest: Path, quiet: bool) -> None:
        if "127.0.0.1" not in url:
            raise urllib.error.URLError("offline (test)")
        download(url, dest, quiet)

    monkeypatch.setattr(registry, "_download", only_local)
    monkeypatch.delenv(registry.MIRROR_ENV, raising=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_mirror(shared_data: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the shared data folder."""
    handler = functools.partial(_QuietHandler, directory=str(shared_data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_published_results_are_registered() -> None:
    assert set(IMPORTABLE + BIAS) == set(RESULT_REGISTRY)
    names = [*REGISTRY, *QUESTION_REGISTRY, *RESULT_REGISTRY]
    assert len(names) == len(set(names)) == len(all_entries())
    for entry in RESULT_REGISTRY.values():
        assert entry.kind in ("file", "folder") and get_entry(entry.name) is entry
        assert entry.files and len({f.name for f in entry.files}) == len(entry.files)
        for file in entry.files:
            assert len(file.sha256) == 64 and file.mirror_path.endswith("/" + file.name)
            assert file.upstream_url and file.upstream_url.startswith(f"https://github.com/{entry.upstream_repo}/raw/")
            assert file.upstream_url.endswith("/" + file.name)
    assert len(get_entry("hyperstition-scores").files) == 13
    assert len(get_entry("mo-steered-responses").files) == 3
    # the bias completions come from two commits of the same project
    assert get_entry("bias-qwen3-instruct-completions").upstream_commit != get_entry("bias-qwen3-base-completions").upstream_commit


@pytest.mark.parametrize("name", sorted(RESULT_REGISTRY))
def test_registered_sha_matches_the_mirror_and_fetch_materialises_it(shared_data: Path, tmp_path: Path,
                                                                     name: str) -> None:
    entry = get_entry(name)
    for file in entry.files:
        assert content_sha256(shared_data / file.mirror_path) == file.sha256, file.name
    path = fetch(name, mirror=str(shared_data), cache=tmp_path, quiet=True)
    folder = tmp_path / name
    assert path == (folder / entry.files[0].name if entry.kind == "file" else folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in entry.files)
    for file in entry.files:  # the upstream bytes under the upstream name
        assert (folder / file.name).read_bytes() == (shared_data / file.mirror_path).read_bytes()
    assert cached_path(entry, tmp_path) == path
    # a second fetch is served from the cache, verified again, without any mirror
    assert fetch(name, mirror=str(tmp_path / "nowhere"), cache=tmp_path, quiet=True) == path


def test_folder_over_http_and_from_a_gzipped_mirror(shared_data: Path, http_mirror: str, tmp_path: Path) -> None:
    path = fetch("mo-steered-responses", mirror=http_mirror, cache=tmp_path / "a", quiet=True)
    assert len(list(path.glob("*.csv"))) == 3
    entry = get_entry("hyperstition-scores")
    mirror = tmp_path / "gz-mirror"
    for file in entry.files:  # a mirror may hold each file gzipped; the cache holds it as it is upstream
        target = mirror / (file.mirror_path + ".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.compress((shared_data / file.mirror_path).read_bytes()))
    folder = fetch(entry.name, mirror=str(mirror), cache=tmp_path / "b", quiet=True)
    for file in entry.files:
        assert (folder / file.name).read_bytes() == (shared_data / file.mirror_path).read_bytes()


def test_env_mirror(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.MIRROR_ENV, str(shared_data))
    path = fetch("bias-economic-prompts", cache=tmp_path, quiet=True)
    assert path.name == "economic_prompts.jsonl" and content_sha256(path) == get_entry(path.parent.name).sha256


def test_corrupted_mirror_copy_is_refused_and_nothing_is_cached(shared_data: Path, tmp_path: Path) -> None:
    entry = get_entry("hyperstition-scores")
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_data / entry.mirror_path, mirror / entry.mirror_path)
    bad = entry.files[4]
    target = mirror / bad.mirror_path
    target.chmod(0o644)
    doc = json.loads(target.read_text())
    doc["summary"]["total_em"] += 1  # one changed number
    target.write_text(json.dumps(doc))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"cannot fetch 'hyperstition-scores' \(file {bad.name}\): .*"
                                        rf"sha256 mismatch \(expected {bad.sha256[:16]}.*offline \(test\)"):
        fetch(entry.name, mirror=str(mirror), cache=cache, quiet=True)
    assert not (cache / entry.name / bad.name).exists()
    assert cached_path(entry, cache) is None
    # a corrupted cached file is refetched, never used; a stray file is removed from the folder
    good = fetch(entry.name, mirror=str(shared_data), cache=cache, quiet=True)
    (good / bad.name).chmod(0o644)
    (good / bad.name).write_text("{}")
    (good / "extra_scored.json").write_text("{}")
    assert fetch(entry.name, mirror=str(shared_data), cache=cache, quiet=True) == good
    assert content_sha256(good / bad.name) == bad.sha256 and not (good / "extra_scored.json").exists()
    # and without a good source it is refused, not used
    (good / bad.name).write_text("{}")
    with pytest.raises(DataError, match=r"cannot fetch 'hyperstition-scores'.*not found"):
        fetch(entry.name, mirror=str(tmp_path / "empty"), cache=cache, quiet=True)


def test_names_that_are_not_results(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"source 'nope': no such file or folder, and not a registered results name "
                                        r"\(em-qwen-coder-insecure-judged"):
        resolve_results("nope", "source")
    with pytest.raises(DataError, match=r"'insecure': is a registered chat entry, not published results"):
        import_results("insecure", tmp_path / "run")
    with pytest.raises(DataError, match=r"'hyperstition-scores': is a registered folder of 13 files"):
        resolve_results("hyperstition-scores", "completions", folders=False)
    with pytest.raises(DataError, match=r"registered results file, not a chat dataset"):
        registry.resolve_dataset("bias-economic-prompts")


@pytest.mark.parametrize("name", IMPORTABLE)
def test_import_by_name_is_the_import_by_path(shared_data: Path, tmp_path: Path, name: str) -> None:
    entry = get_entry(name)
    by_path = import_results(shared_data / entry.mirror_path, tmp_path / "by-path")
    by_name = import_results(name, tmp_path / "by-name", mirror=str(shared_data))
    pd.testing.assert_frame_equal(pd.read_parquet(by_path / "scores.parquet"),
                                  pd.read_parquet(by_name / "scores.parquet"))
    assert (by_path / "generations.jsonl").read_bytes() == (by_name / "generations.jsonl").read_bytes()
    assert json.loads((by_path / "stats.json").read_text()) == json.loads((by_name / "stats.json").read_text())
    manifest = json.loads((by_name / "manifest.json").read_text())
    assert manifest["registry"] == {"name": name, "source": entry.source, "sha256": entry.sha256}
    assert sorted(s["sha256"] for s in manifest["sources"]) == sorted(f.sha256 for f in entry.files)
    # the same name again: already complete, nothing to do
    assert import_results(name, tmp_path / "by-name", mirror=str(shared_data)) == by_name


def test_cli_list_fetch_and_import_by_name(shared_data: Path, tmp_path: Path) -> None:
    listed = run_cli("data", "list")
    assert listed.returncode == 0, listed.stderr
    for name in RESULT_REGISTRY:
        assert name in listed.stdout
    assert "(13 files)" in listed.stdout
    fetched = run_cli("data", "fetch", "mo-steered-responses", "--mirror", str(shared_data))
    assert fetched.returncode == 0, fetched.stderr
    assert len(list(Path(fetched.stdout.strip().splitlines()[-1]).glob("*.csv"))) == 3
    run = tmp_path / "betley"
    done = run_cli("import", "em-qwen-coder-insecure-judged", "--output", str(run), "--mirror", str(shared_data))
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "stats.json").read_text())["n_answers"] == 70
    missing = run_cli("data", "fetch", "hyperstition-scores", "--mirror", str(tmp_path / "nothing-here"),
                      env={"EMKIT_CACHE": str(tmp_path / "other-cache")})
    assert missing.returncode == 2 and "cannot fetch 'hyperstition-scores'" in missing.stderr


def _bias_original() -> dict:
    cfg = yaml.safe_load((ROOT / "examples" / "bias-original.yaml").read_text())
    cfg["keywords"]["lexicons"] = [lex if lex == "default" else str(ROOT / lex) for lex in cfg["keywords"]["lexicons"]]
    return cfg


def test_bias_original_example_names_registered_files() -> None:
    text = (ROOT / "examples" / "bias-original.yaml").read_text()
    assert "../shared" not in text and "/shared/" not in text
    cfg = BiasConfig(**_bias_original())
    assert cfg.prompts == "bias-economic-prompts"
    assert [m.completions for m in cfg.models] == ["bias-qwen3-base-completions", "bias-qwen3-instruct-completions"]


def test_bias_original_runs_by_name_as_by_path(shared_data: Path, tmp_path: Path) -> None:
    from emkit.studies.bias.run import check_inputs, run_bias

    data = _bias_original()
    settings = {"n_boot": 200, "permutations": 200, "report": False}
    by_name = BiasConfig(**{**data, **settings, "output": tmp_path / "by-name", "mirror": str(shared_data)})
    prompts, _ = check_inputs(by_name)
    assert prompts.name == "bias-economic-prompts" and len(prompts) == 9
    original = shared_data / "seeds/team-shard-experiments/postrained_base_model"
    paths = {**data, "prompts": str(original / "data/economic_prompts.jsonl"),
             "models": [{**m, "completions": str(original / f"results/qwen3_{kind}_all_runs.json")}
                        for m, kind in zip(data["models"], ("base", "instruct"))]}
    by_path = BiasConfig(**{**paths, **settings, "output": tmp_path / "by-path"})
    named = pd.read_parquet(run_bias(by_name, progress=False, emit=lambda m: None)["run"] / "labels.parquet")
    pathed = pd.read_parquet(run_bias(by_path, progress=False, emit=lambda m: None)["run"] / "labels.parquet")
    assert named.groupby("model").size().to_dict() == {"qwen3-base": 450, "qwen3-instruct": 450}
    same = [c for c in named.columns if "source" not in c]
    pd.testing.assert_frame_equal(named[same], pathed[same])
    # the mirror is where the files come from, not part of the result: the config hash ignores it
    from emkit.core.config import config_hash

    assert config_hash(by_name) == config_hash(BiasConfig(**{**by_name.model_dump(), "mirror": None}))


def test_bias_refuses_a_folder_or_unknown_completions(tmp_path: Path) -> None:
    from emkit.studies.bias.run import check_inputs

    data = _bias_original()
    data["models"][0]["completions"] = "hyperstition-scores"
    with pytest.raises(DataError, match=r"models\[qwen3-base\]\.completions 'hyperstition-scores': is a registered folder"):
        check_inputs(BiasConfig(**{**data, "output": tmp_path / "a", "prompts": "default", "classifiers": ["llm"]}))
    data["models"][0]["completions"] = str(tmp_path / "none.json")
    with pytest.raises(DataError, match=r"none.json: file not found"):
        check_inputs(BiasConfig(**{**data, "output": tmp_path / "b", "prompts": "default", "classifiers": ["llm"]}))
