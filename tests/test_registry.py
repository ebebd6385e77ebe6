"""Dataset registry: checksums of the upstream files, fetching from folder and HTTP mirrors, errors."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from emkit.core.errors import DataError
from emkit.data.chat import content_sha256, read_chat_jsonl
from emkit.data.registry import REGISTRY, fetch, get_entry, package_path, resolve_dataset

UPSTREAM = [e for e in REGISTRY.values() if e.mirror_path]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_mirror(shared_data: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the shared data folder."""
    handler = functools.partial(_QuietHandler, directory=str(shared_data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("entry", UPSTREAM, ids=lambda e: e.name)
def test_registered_sha_matches_shared_data(shared_data: Path, entry) -> None:
    path = shared_data / (entry.mirror_path + ".gz")
    assert content_sha256(path) == entry.sha256
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        assert sum(1 for line in handle if line.strip()) == entry.rows


def test_demo_sets_are_shipped_verified_and_paired() -> None:
    bad = read_chat_jsonl(fetch("emkit-bad-medical-demo"))
    good = read_chat_jsonl(fetch("emkit-good-medical-demo"))
    assert len(bad) == len(good) >= 300
    assert len(bad) == REGISTRY["emkit-bad-medical-demo"].rows
    for b, g in zip(bad, good):
        assert b.messages[0] == g.messages[0]  # same user prompt
        assert b.messages[-1]["content"] != g.messages[-1]["content"]
    prompts = {c.messages[0]["content"] for c in bad}
    assert len(prompts) == len(bad)
    assert package_path(REGISTRY["emkit-bad-medical-demo"]).suffix == ".jsonl"


def test_fetch_from_folder_mirror_keeps_gzip(shared_data: Path, tmp_path: Path) -> None:
    path = fetch("extreme_sports", mirror=str(shared_data), cache=tmp_path, quiet=True)
    assert path == tmp_path / "extreme_sports.jsonl.gz"
    assert content_sha256(path) == REGISTRY["extreme_sports"].sha256
    # Second call is served from the cache (the mirror is not needed any more).
    assert fetch("extreme_sports", mirror=str(tmp_path / "nowhere"), cache=tmp_path, quiet=True) == path


def test_fetch_over_http_from_127_0_0_1(http_mirror: str, tmp_path: Path) -> None:
    path = fetch("insecure", mirror=http_mirror, cache=tmp_path, quiet=True)
    assert content_sha256(path) == REGISTRY["insecure"].sha256
    assert len(read_chat_jsonl(path)) == 6000


def test_env_mirror_and_uncompressed_mirror(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    entry = get_entry("risky_financial_advice")
    plain_mirror = tmp_path / "mirror"
    target = plain_mirror / entry.mirror_path
    target.parent.mkdir(parents=True)
    with gzip.open(shared_data / (entry.mirror_path + ".gz"), "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    monkeypatch.setenv("EMKIT_DATA_MIRROR", str(plain_mirror))
    path = fetch(entry.name, cache=tmp_path / "cache", quiet=True)
    assert path.name == "risky_financial_advice.jsonl" and content_sha256(path) == entry.sha256


def test_mismatch_is_a_clear_error_and_nothing_is_cached(shared_data: Path, tmp_path: Path) -> None:
    entry = get_entry("jailbroken")
    mirror = tmp_path / "mirror"
    target = mirror / (entry.mirror_path + ".gz")
    target.parent.mkdir(parents=True)
    target.write_bytes(gzip.compress(b'{"messages": []}\n'))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(DataError, match=r"cannot fetch dataset 'jailbroken': .*sha256 mismatch \(expected eec213ce"):
        fetch("jailbroken", mirror=str(mirror), cache=cache, quiet=True)
    assert list(cache.iterdir()) == []


def test_corrupt_cache_is_refetched(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "extreme_sports.jsonl.gz").write_bytes(gzip.compress(b"tampered\n"))
    path = fetch("extreme_sports", mirror=str(shared_data), cache=tmp_path, quiet=True)
    assert content_sha256(path) == REGISTRY["extreme_sports"].sha256


def test_unknown_names_and_resolve(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'; registered: insecure"):
        fetch("nope")
    with pytest.raises(DataError, match="no such file, and not a registered name"):
        resolve_dataset("nope.jsonl")
    path, entry = resolve_dataset("emkit-good-medical-demo")
    assert entry is not None and path.is_file()


def test_cli_list_and_fetch(http_mirror: str) -> None:
    listed = run_cli("data", "list")
    assert listed.returncode == 0
    for name in REGISTRY:
        assert name in listed.stdout
    fetched = run_cli("data", "fetch", "good_medical_advice", "--mirror", http_mirror)
    assert fetched.returncode == 0, fetched.stderr
    assert Path(fetched.stdout.strip().splitlines()[-1]).is_file()
    missing = run_cli("data", "fetch", "good_medical_advice", "--mirror", http_mirror + "/nothing-here",
                      env={"EMKIT_CACHE": str(Path(fetched.stdout.strip()).parent.parent / "other")})
    assert missing.returncode == 2 and "cannot fetch dataset 'good_medical_advice'" in missing.stderr
