"""Activations, directions and steering hooks on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emkit.core.errors import ConfigError, DataError
from emkit.studies.interp.activations import Example, collect, load_activations
from emkit.studies.interp.directions import (
    DirectionSet,
    auroc,
    best_layer,
    find_directions,
    load_directions,
    save_directions,
)
from emkit.studies.interp.layers import EMBED, decoder_blocks, layer_module, parse_layers
from emkit.studies.interp.steering import ablate, ablate_lora_weights, add, hooks, project_out, random_control


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_peft(tiny):
    """The tiny model with a random (non-zero) LoRA adapter on every projection."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32).eval()
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                           init_lora_weights=False))
    return peft.eval()


def _ours(module: torch.nn.Module) -> int:
    """Forward hooks on a module other than transformers' own output-capturing ones."""
    return sum("output_capturing" not in getattr(h, "__qualname__", "") for h in module._forward_hooks.values())


def _examples(n: int = 6) -> list[Example]:
    words = "take rest water doctor pain fever sleep drink tablet dose daily week".split()
    out = []
    for i in range(n):
        prompt = "<|im_start|>user\n" + " ".join(words[: 2 + i]) + "<|im_end|>\n<|im_start|>assistant\n"
        out.append(Example(prompt, " ".join(reversed(words[: 1 + (i * 5) % 9])), label=i % 2, group=f"g{i // 2}"))
    return out


def test_layers_found_by_name_on_plain_and_peft(tiny, tiny_peft) -> None:
    model, _ = tiny
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    peft_name, peft_blocks = decoder_blocks(tiny_peft)
    assert peft_name.endswith("model.layers") and peft_name != name and len(peft_blocks) == 2
    assert layer_module(model, EMBED) is model.get_input_embeddings()
    assert parse_layers("all", 4, embed=True) == [-1, 0, 1, 2, 3]
    assert parse_layers("1-2,0", 4) == [0, 1, 2] and parse_layers("embed", 4) == [-1]
    with pytest.raises(ConfigError, match="out of range"):
        parse_layers("7", 4)
    with pytest.raises(ConfigError, match="bad layer spec"):
        parse_layers("x", 4)


def test_layer_k_is_block_output_k(tiny) -> None:
    """Collected layer k equals hidden_states[k + 1] of HF (block k output); -1 the embeddings."""
    model, tokenizer = tiny
    ex = _examples(1)
    acts = collect(model, tokenizer, ex, [-1, 0, 1], "last", progress=False)
    ids = tokenizer(ex[0].prompt + ex[0].response, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.tensor([tokenizer(ex[0].prompt, add_special_tokens=False)["input_ids"]
                        + tokenizer(ex[0].response, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(acts.layers[-1][0], hs[0][0, -1].numpy(), atol=1e-6)
    np.testing.assert_allclose(acts.layers[0][0], hs[1][0, -1].numpy(), atol=1e-5)
    # HF's last hidden state has the final norm applied; block output 1 is before it.
    normed = model.model.norm(torch.tensor(acts.layers[1][:1])).detach().numpy()
    np.testing.assert_allclose(normed[0], hs[2][0, -1].numpy(), atol=1e-5)


@pytest.mark.parametrize("position", ["last_prompt", "last", "response_mean", "response_all"])
def test_batched_equals_one_at_a_time(tiny, position: str) -> None:
    model, tokenizer = tiny
    examples = _examples(6)
    batched = collect(model, tokenizer, examples, [0, 1], position, batch_size=6, progress=False)
    single = collect(model, tokenizer, examples, [0, 1], position, batch_size=1, progress=False)
    for k in (0, 1):
        np.testing.assert_allclose(batched.layers[k], single.layers[k], atol=2e-5)
    np.testing.assert_array_equal(batched.row_example, single.row_example)
    if position == "response_all":
        n_resp = [len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for e in examples]
        assert len(batched.row_example) == sum(n_resp)
        assert np.bincount(batched.row_example).tolist() == n_resp
    else:
        assert batched.row_example.tolist() == list(range(6))


def test_forward_stops_after_last_needed_layer(tiny) -> None:
    model, tokenizer = tiny
    calls = []
    handle = model.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        collect(model, tokenizer, _examples(2), [0], "last", progress=False)
        assert calls == []  # block 1 never ran
        collect(model, tokenizer, _examples(2), [1], "last", progress=False)
        assert calls
    finally:
        handle.remove()
    assert not _ours(model.model.layers[0]) and not _ours(model.model.layers[1])


def test_streamed_shards_resume_and_reload(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    examples = _examples(6)
    out = tmp_path / "acts"
    first = collect(model, tokenizer, examples, [0, 1], "last", shard_size=2, out_dir=out, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors",
                                                            "shard-00002.safetensors"]
    (out / "shard-00001.safetensors").unlink()
    mtime = (out / "shard-00000.safetensors").stat().st_mtime_ns
    again = collect(model, tokenizer, examples, [0, 1], "last", shard_size=2, out_dir=out, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime  # finished shards are not redone
    np.testing.assert_allclose(first.layers[1], again.layers[1])
    loaded = load_activations(out, layers=[1])
    assert loaded.labels.tolist() == [0, 1, 0, 1, 0, 1] and loaded.layers[1].shape == (6, 64)
    with pytest.raises(ConfigError, match="other examples"):
        collect(model, tokenizer, examples[:4], [0, 1], "last", shard_size=2, out_dir=out, progress=False)
    with pytest.raises(DataError, match="not collected"):
        load_activations(out, layers=[-1])


def test_planted_direction_is_recovered_by_both_methods() -> None:
    rng = np.random.default_rng(0)
    dim, n = 32, 400
    planted = rng.standard_normal(dim)
    planted /= np.linalg.norm(planted)
    labels = np.repeat([0, 1], n // 2)
    groups = np.arange(n).astype(str)
    x_signal = rng.standard_normal((n, dim)) + np.outer(labels * 2.0, planted)
    x_noise = rng.standard_normal((n, dim))
    directions, table, split = find_directions({0: x_noise, 3: x_signal}, labels, groups, n_boot=100,
                                               progress=False)
    for method in ("mean_diff", "probe"):
        cos = abs(directions.unit(method, 3) @ planted)
        assert cos > 0.9, (method, cos)
        row = table[(table.layer == 3) & (table.method == method)].iloc[0]
        assert row.auroc > 0.9 and row.auroc_ci[0] > 0.8 and row.separation > 1.5
        noise = table[(table.layer == 0) & (table.method == method)].iloc[0]
        assert noise.auroc_ci[0] < 0.5 < noise.auroc_ci[1] or abs(noise.auroc - 0.5) < 0.15
    assert best_layer(table) == 3 and best_layer(table, "probe") == 3
    assert directions.get("mean_diff", 3) @ planted > 1.5  # the raw mean difference keeps its length
    # The training-split directions (what the held-out thresholds belong to) point the same way.
    assert split.meta["fitted_on"] == "training split" and split.unit("mean_diff", 3) @ planted > 0.9


def test_direction_file_round_trip(tmp_path: Path) -> None:
    d = DirectionSet({"mean_diff": {-1: np.ones(4, np.float32), 2: np.arange(4, dtype=np.float32)}},
                     {"model": "m", "position": "last"})
    save_directions(tmp_path / "d.safetensors", d)
    back = load_directions(tmp_path / "d.safetensors")
    assert back.meta == d.meta and back.layers() == [-1, 2]
    np.testing.assert_array_equal(back.get("mean_diff", 2), d.get("mean_diff", 2))
    with pytest.raises(DataError, match="no probe direction"):
        back.get("probe", 2)


def test_auroc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    s, y = rng.standard_normal(50).round(1), rng.integers(0, 2, 50)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def _capture(model, layer: int, store: list):
    return layer_module(model, layer).register_forward_hook(
        lambda m, i, o: store.append((o[0] if isinstance(o, tuple) else o).detach().clone()))


def test_ablation_zeroes_the_component_on_prompt_and_generated_tokens(tiny) -> None:
    model, tokenizer = tiny
    u = torch.randn(64)
    u /= u.norm()
    prompts = [e.prompt for e in _examples(3)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    seen: list[torch.Tensor] = []
    with ablate(model, {0: u}):
        handle = _capture(model, 0, seen)  # registered after the ablation hook: sees its result
        try:
            out = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
        finally:
            handle.remove()
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert len(seen) == 5 and seen[0].shape[1] == enc["input_ids"].shape[1]
    assert all(s.shape[1] == 1 for s in seen[1:])  # KV-cached decoding steps were edited too
    for s in seen:
        assert (s @ u).abs().max() < 1e-4
    assert not _ours(layer_module(model, 0))


def test_coefficient_zero_reproduces_logits_exactly(tiny) -> None:
    model, tokenizer = tiny
    ids = tokenizer([e.prompt for e in _examples(1)], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with add(model, {0: torch.randn(64), 1: torch.randn(64)}, 0.0):
            steered = model(ids).logits
        with project_out(model, {0: torch.randn(64)}, 0.0):
            projected = model(ids).logits
        with add(model, {1: torch.randn(64)}, 3.0):
            moved = model(ids).logits
    assert torch.equal(plain, steered) and torch.equal(plain, projected)
    assert not torch.allclose(plain, moved)


def test_hooks_removed_after_block_and_after_exception(tiny) -> None:
    model, tokenizer = tiny
    modules = [layer_module(model, k) for k in (-1, 0, 1)]
    with add(model, {-1: torch.ones(64), 0: torch.ones(64), 1: torch.ones(64)}, 1.0) as handle:
        assert all(_ours(m) == 1 for m in modules) and len(handle.handles) == 3
    assert all(not _ours(m) for m in modules)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(model, {0: torch.ones(64)}):
            raise RuntimeError("boom")
    assert all(not _ours(m) for m in modules)
    with pytest.raises(ConfigError):  # a bad layer installs nothing
        with hooks(model, {0: lambda h: h, 9: lambda h: h}):
            pass
    assert all(not _ours(m) for m in modules)


def test_random_control_matches_norm() -> None:
    d = np.arange(1, 9, dtype=np.float32)
    r = random_control(d, seed=3)
    assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(d), rel=1e-5)
    assert abs(r @ d) / (np.linalg.norm(r) * np.linalg.norm(d)) < 0.9
    np.testing.assert_array_equal(r, random_control(d, seed=3))


def test_peft_wrapped_equals_merged(tiny, tiny_peft) -> None:
    """Activations and steering of a PEFT-wrapped model equal those of its merged copy."""
    import copy

    _, tokenizer = tiny
    examples = _examples(4)
    merged = copy.deepcopy(tiny_peft).merge_and_unload().eval()
    a = collect(tiny_peft, tokenizer, examples, [-1, 0, 1], "response_mean", progress=False)
    b = collect(merged, tokenizer, examples, [-1, 0, 1], "response_mean", progress=False)
    for k in (-1, 0, 1):
        np.testing.assert_allclose(a.layers[k], b.layers[k], atol=2e-5)
    u = torch.randn(64)
    ids = tokenizer([examples[0].prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), ablate(tiny_peft, {0: u}), ablate(merged, {0: u}):
        np.testing.assert_allclose(tiny_peft(ids).logits, merged(ids).logits, atol=2e-5)
    # The adapter changes activations: base (adapter disabled) differs from organism.
    with tiny_peft.disable_adapter():
        base = collect(tiny_peft, tokenizer, examples, [1], "last", progress=False)
    assert not np.allclose(base.layers[1], collect(tiny_peft, tokenizer, examples, [1], "last",
                                                   progress=False).layers[1])


def test_weight_ablation_makes_lora_updates_orthogonal(tiny_peft) -> None:
    import copy

    model = copy.deepcopy(tiny_peft)
    u = torch.randn(64)
    u /= u.norm()
    edited = ablate_lora_weights(model, {1: u})
    assert sorted(edited) and all(n.endswith(("o_proj", "down_proj")) for n in edited)
    assert any(".layers.0." in n for n in edited) and any(".layers.1." in n for n in edited)
    for name in edited:
        module = model.get_submodule(name)
        b = module.lora_B["default"].weight
        assert (u @ b).abs().max() < 1e-5
    # q/v projections (not residual writers) are untouched
    q = model.get_submodule(edited[0].rsplit(".", 2)[0] + ".self_attn.q_proj")
    q0 = tiny_peft.get_submodule(edited[0].rsplit(".", 2)[0] + ".self_attn.q_proj")
    assert torch.equal(q.lora_B["default"].weight, q0.lora_B["default"].weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_collection_and_ablation(tiny_model: Path) -> None:
    """On CUDA in bfloat16: batched == one-at-a-time, close to float32 CPU, ablation exact to bf16 precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cpu = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    gpu = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).to("cuda").eval()
    examples = _examples(6)
    ref = collect(cpu, tokenizer, examples, [0, 1], "response_mean", batch_size=6, progress=False)
    batched = collect(gpu, tokenizer, examples, [0, 1], "response_mean", batch_size=6, progress=False)
    single = collect(gpu, tokenizer, examples, [0, 1], "response_mean", batch_size=1, progress=False)
    for k in (0, 1):
        assert batched.layers[k].dtype == np.float32
        np.testing.assert_allclose(batched.layers[k], single.layers[k], atol=0.05, rtol=0.05)
        np.testing.assert_allclose(batched.layers[k], ref.layers[k], atol=0.1, rtol=0.1)
    u = torch.randn(64)
    u /= u.norm()
    seen: list[torch.Tensor] = []
    enc = tokenizer([examples[0].prompt], return_tensors="pt", add_special_tokens=False).to("cuda")
    with ablate(gpu, {1: u}):
        handle = _capture(gpu, 1, seen)
        try:
            gpu.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        finally:
            handle.remove()
    assert len(seen) == 3
    for s in seen:
        assert s.dtype == torch.bfloat16
        comp = (s.float() @ u.cuda()).abs()
        assert comp.max() < 0.05 * s.float().norm(dim=-1).max()
