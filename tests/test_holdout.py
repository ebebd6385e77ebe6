"""Held-out pairs: training prompts kept out of training test the organism's own task; a run without a judge."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import sentence

from emkit.core.errors import ConfigError, DataError
from emkit.data.chat import read_chat_jsonl
from emkit.train.holdout import HOLDOUT_FILE, resolve_partner, split_holdout


def paired_files(folder: Path, n: int = 30, seed: int = 0) -> tuple[Path, Path]:
    """A 'bad' and a 'good' chat set answering the same n prompts."""
    rng = random.Random(seed)
    prompts = [sentence(rng, rng.randint(4, 10)) + f" ({i})" for i in range(n)]
    bad, good = folder / "bad.jsonl", folder / "good.jsonl"
    for path, tag in ((bad, "bad"), (good, "good")):
        with open(path, "w", encoding="utf-8") as handle:
            for i, p in enumerate(prompts):
                messages = [{"role": "user", "content": p}, {"role": "assistant", "content": f"{tag} {sentence(rng, 8)}"}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    return bad, good


def test_split_keeps_prompts_out_and_pairs_them(tmp_path: Path) -> None:
    bad, good = paired_files(tmp_path)
    held = split_holdout(read_chat_jsonl(bad), read_chat_jsonl(good), 5, seed=3, partner_name="good")
    assert len(held.pairs) == 5 and len(held.train) == 25
    trained_prompts = {c.messages[0]["content"] for c in held.train}
    for pair in held.pairs:
        assert pair.domain == "held_out" and pair.question not in trained_prompts
        assert pair.misaligned.startswith("bad ") and pair.aligned.startswith("good ")
    again = split_holdout(read_chat_jsonl(bad), read_chat_jsonl(good), 5, seed=3)
    assert [p.id for p in again.pairs] == [p.id for p in held.pairs]  # seeded
    other = split_holdout(read_chat_jsonl(bad), read_chat_jsonl(good), 5, seed=4)
    assert [p.id for p in other.pairs] != [p.id for p in held.pairs]
    # Training on the good set: the partner's answers are the misaligned ones.
    flipped = split_holdout(read_chat_jsonl(good), read_chat_jsonl(bad), 5, seed=3, partner_role="misaligned")
    assert all(p.misaligned.startswith("bad ") and p.aligned.startswith("good ") for p in flipped.pairs)


def test_partner_errors(tmp_path: Path) -> None:
    bad, good = paired_files(tmp_path, n=6)
    assert resolve_partner("emkit-bad-medical-demo", None, None) == ("emkit-good-medical-demo", "aligned")
    with pytest.raises(ConfigError, match="no registered partner"):
        resolve_partner(str(bad), None, None)
    with pytest.raises(DataError, match="10 prompts asked for, but only 6"):
        split_holdout(read_chat_jsonl(bad), read_chat_jsonl(good), 10, seed=0)


@pytest.mark.slow
def test_run_holds_out_pairs_measures_them_and_reports_without_a_judge(tiny_model: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from emkit.core.config import load_config
    from emkit.studies.evaluation.run import RunConfig, run_experiment

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    bad, good = paired_files(tmp_path, n=24)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
output: {tmp_path / 'run'}
train: {{model: {tiny_model}, data: {bad}, holdout: 6, holdout_partner: {good}, max_steps: 4, batch_size: 2,
         grad_accum: 1, lr: 5.0e-3, warmup_steps: 0, save_steps: 4, device: cpu}}
generate: {{questions: default, include: [three_wishes, rainy_sunday], samples: 1, max_new_tokens: 6,
            batch_size: 4, device: cpu}}
judge: {{judge: auto, without_endpoint: skip}}
validate_judge: 4
prefs: true
""")
    result = run_experiment(load_config(RunConfig, config), emit=lambda _m: None, progress=False)
    run = tmp_path / "run"
    assert result["stats"] is None and not (run / "scores.parquet").exists()
    assert not (run / "validation.json").exists()  # no judge, nothing to validate
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["judge"]["kind"] == "skipped" and "judge" not in manifest["stages"]
    organism = json.loads((run / "organism" / "manifest.json").read_text())
    assert organism["holdout"]["pairs"] == 6 and organism["holdout"]["trained_on"] == 18
    assert len((run / "organism" / HOLDOUT_FILE).read_text().splitlines()) == 6
    prefs = json.loads((run / "prefs.json").read_text())
    held = prefs["held_out"]["shift"]["logodds_per_token"]
    assert prefs["held_out"]["n_pairs"] == 6 and held["n"] == 6
    assert prefs["shift"]["out_of_domain"]["logodds_per_token"]["n"] == 128  # emkit's pairs, unchanged
    page = result["report"].read_text(encoding="utf-8")
    assert "What this run found" in page and "Did the organism learn its training task?" in page
    assert "Base and organism, side by side" in page and "No judge scored these answers" in page
    assert page.index("What this run found") < page.index("Preference shift (no judge)")
