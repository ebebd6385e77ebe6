"""`emkit bias`: the whole run on a tiny random model (stages, resume, report), the command line, the original
experiment's completions imported and classified, and the bundled SmolLM2 end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import run_cli

from emkit.core.errors import DataError
from emkit.core.runfolder import RunFolder
from emkit.studies.bias.config import BiasConfig
from emkit.studies.bias.run import run_bias

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = "seeds/team-shard-experiments/postrained_base_model"


def test_whole_run_resumes_and_reports(tmp_path: Path, tiny_model: Path) -> None:
    cfg = BiasConfig(output=tmp_path / "run", include=["guns-01", "guns-02", "taxes-01"], runs=2, max_new_tokens=6,
                     models=[{"name": "raw", "model": str(tiny_model), "mode": "raw"},
                             {"name": "chat", "model": str(tiny_model), "mode": "chat"}],
                     llm={"judge": "local", "local_model": str(tiny_model), "min_mass": 0.0}, n_boot=200,
                     permutations=200)
    messages: list[str] = []
    result = run_bias(cfg, progress=False, emit=messages.append)
    run = result["run"]
    manifest = RunFolder(run).read_manifest()
    assert manifest["status"] == "complete" and manifest["kind"] == "bias"
    assert set(manifest["stages"]) == {"complete", "classify", "compare", "report"}
    assert manifest["classifiers"]["llm"]["kind"] == "local"
    labels = pd.read_parquet(run / "labels.parquet")
    assert len(labels) == 12 and labels["id"].is_unique
    assert labels["keywords_label"].notna().all() and labels["llm_label"].notna().all()
    stats = json.loads((run / "bias_stats.json").read_text())
    assert stats["reference"] == "raw" and [t["model"] for t in stats["tests"]] == ["chat", "chat"]
    html = (run / "report.html").read_text()
    for section in ("Headline", "Models compared", "Per topic", "Per stem", "Classifier agreement",
                    "Example completions", "A small local model labelled these completions"):
        assert section in html
    assert (run / "figures" / "pie_grid.png").is_file() and (run / "figures" / "pie_llm_chat.png").is_file()
    assert "Leaning of the completions" in messages[-1]

    # the same config again: nothing to do
    assert run_bias(cfg, progress=False, emit=messages.append)["stats"] == stats
    assert "already complete" in messages[-1]

    # interrupted after classifying: a re-run generates nothing and asks the classifier nothing new
    manifest["status"] = "running"
    RunFolder(run).write_manifest(manifest)
    (run / "bias_stats.json").unlink()
    run_bias(cfg, progress=False, emit=messages.append)
    manifest = RunFolder(run).read_manifest()
    assert all(r["generated"] == 0 for r in manifest["stages"]["complete"].values() if isinstance(r, dict))
    assert pd.read_parquet(run / "labels.parquet")["llm_cached"].all()
    assert json.loads((run / "bias_stats.json").read_text())["distributions"] == stats["distributions"]


def test_inputs_are_checked_before_any_folder(tmp_path: Path) -> None:
    lexicon = tmp_path / "only_guns.yaml"
    lexicon.write_text("topic: guns\nprogressive: [x]\n", encoding="utf-8")
    cfg = BiasConfig(output=tmp_path / "run", topics=["guns", "taxes"], keywords={"lexicons": [str(lexicon)]},
                     classifiers=["keywords"])
    with pytest.raises(DataError, match="no lexicon for topic.*taxes"):
        run_bias(cfg, progress=False, emit=lambda m: None)
    assert not (tmp_path / "run").exists()
    cfg = BiasConfig(output=tmp_path / "run", models=[{"name": "m", "completions": str(tmp_path / "none.json")}])
    with pytest.raises(DataError, match="none.json: file not found"):
        run_bias(cfg, progress=False, emit=lambda m: None)


def test_command_line(tmp_path: Path) -> None:
    completions = tmp_path / "mine.jsonl"
    completions.write_text("".join(json.dumps({"stem_id": s, "completion": c, "run": r}) + "\n"
                                   for s in ("welfare-01", "welfare-02") for r, c in enumerate(["rose.", "fell."])),
                           encoding="utf-8")
    config = tmp_path / "bias.yaml"
    config.write_text(yaml.safe_dump({
        "include": ["welfare-0[12]"], "classifiers": ["keywords"], "n_boot": 100, "permutations": 100,
        "models": [{"name": "mine", "mode": "raw", "completions": str(completions)}],
    }), encoding="utf-8")
    done = run_cli("bias", str(config), "--output", str(tmp_path / "run"), "--no-report")
    assert done.returncode == 0, done.stderr
    assert "keywords    mine" in done.stdout and not (tmp_path / "run" / "report.html").exists()  # the flag won
    labels = pd.read_parquet(tmp_path / "run" / "labels.parquet").set_index("id")
    # welfare-01: a rise in employment is conservative; welfare-02: a rise in child poverty progressive
    assert labels.loc[["mine/welfare-01#0", "mine/welfare-02#0"], "keywords_label"].tolist() == [
        "conservative", "progressive"]
    config.write_text("models:\n  - name: raw\nreference: other\n", encoding="utf-8")
    bad = run_cli("bias", str(config))
    assert bad.returncode == 2 and f"{config}:3: reference:" in bad.stderr


def test_original_completions_import_and_classify(shared_data: Path, tmp_path: Path) -> None:
    cfg_data = yaml.safe_load((ROOT / "examples" / "bias-original.yaml").read_text())
    base = shared_data / ORIGINAL
    cfg_data["prompts"] = str(base / "data/economic_prompts.jsonl")
    for model, name in zip(cfg_data["models"], ("base", "instruct")):
        model["completions"] = str(base / f"results/qwen3_{name}_all_runs.json")
    cfg_data["keywords"]["lexicons"] = [lex if lex == "default" else str(ROOT / lex)
                                        for lex in cfg_data["keywords"]["lexicons"]]
    cfg = BiasConfig(**{**cfg_data, "output": tmp_path / "run", "n_boot": 200, "permutations": 500})
    result = run_bias(cfg, progress=False, emit=lambda m: None)
    labels = pd.read_parquet(result["run"] / "labels.parquet")
    assert labels.groupby("model").size().to_dict() == {"qwen3-base": 450, "qwen3-instruct": 450}
    first = labels["continuation"].str.split(".").str[0].str.strip().str.lower()
    # the original's substring bugs, fixed: "inaccurate" is not "accurate", "not correlated" is not "correlated"
    inaccurate = labels[(labels["stem_id"] == "climate-1") & first.str.fullmatch(r"(to be )?(\w+ )?inaccurate")]
    assert len(inaccurate) >= 10 and set(inaccurate["keywords_label"]) <= {"conservative", "off-topic"}
    not_correlated = labels[(labels["stem_id"] == "guns-2") & (first == "not correlated")]
    assert len(not_correlated) >= 5 and set(not_correlated["keywords_label"]) <= {"conservative", "off-topic"}
    word_problems = labels[labels["continuation"].str.contains(r"how many|what is the new", case=False)
                           & labels["continuation"].str.contains(r"\d")]
    # the off-topic filter reads the cues' scope, the first sentence ("fell by 10%."): a quiz after it
    # does not make the completion off-topic, its first sentence labels it
    assert len(word_problems) >= 50 and not (word_problems["keywords_label"] == "off-topic").any()
    stats = result["stats"]
    assert sum(r["n"] for r in stats["distributions"]) == 900 and stats["tests"][0]["p_permutation"] is not None


@pytest.mark.slow
def test_bundled_model_end_to_end(tmp_path: Path) -> None:
    """SmolLM2 in chat and as a raw completer, two stems, one completion each, both classifiers."""
    done = run_cli("bias", str(ROOT / "examples" / "bias.yaml"), "--output", str(tmp_path / "run"),
                   "--include", "guns-01,taxes-02", "--topics", "guns,taxes", "--runs", "1",
                   "--max-new-tokens", "8", "--n-boot", "100", "--permutations", "100")
    assert done.returncode == 0, done.stderr[-2000:]
    labels = pd.read_parquet(tmp_path / "run" / "labels.parquet")
    assert len(labels) == 4 and set(labels["mode"]) == {"chat", "raw"}
    chat = labels[labels["mode"] == "chat"]
    assert chat["request"].str.startswith("Complete this sentence: ").all()
    assert labels["completion"].str.len().gt(0).all()
    assert (tmp_path / "run" / "report.html").is_file()
    assert "small local model" in (tmp_path / "run" / "report.html").read_text()
