"""Where the residual stream is read and written: decoder blocks found by module name.

One layer convention everywhere (files, tables, plots, hooks): **layer k is the output of decoder
block k** (0-based), i.e. the residual stream after block k has added its attention and MLP
updates, before the next block (and, for the last block, before the final norm). Layer -1 is the
embedding output, the input of block 0. A direction read at layer k is applied at layer k: the same
module, the same tensor, so reading and steering can never be off by one.

Blocks are found by name (the longest `ModuleList` called `layers`, `h`, `blocks` ...), so the same
code works on a plain model, a PEFT-wrapped one (`base_model.model.model.layers`), a merged one, and
a model split across devices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from emkit.core.errors import ConfigError

EMBED = -1
_BLOCK_LIST = re.compile(r"(^|\.)(layers|h|blocks|block|decoder_layers)$")


def decoder_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's decoder blocks in order, and the dotted name of their list."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and _BLOCK_LIST.search(name) and len(module) > 0:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"{type(model).__name__}: no decoder blocks found (no ModuleList named layers/h/blocks)")
    return best[0], list(best[1])


def embedding_module(model: nn.Module) -> nn.Module:
    """The token-embedding module (its output is layer -1)."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and name.endswith(("embed_tokens", "wte", "word_embeddings")):
                return module
    raise ConfigError(f"{type(model).__name__}: no input embedding found")


def n_blocks(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_blocks(model)[1])


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is layer `layer` (-1: embeddings)."""
    if layer == EMBED:
        return embedding_module(model)
    blocks = decoder_blocks(model)[1]
    if not 0 <= layer < len(blocks):
        raise ConfigError(f"layer {layer} out of range: the model has blocks 0..{len(blocks) - 1} (and -1, embeddings)")
    return blocks[layer]


def layer_label(layer: int) -> str:
    """Human label of a layer index: 'embed' or 'block k'."""
    return "embed" if layer == EMBED else f"block {layer}"


def parse_layers(spec: str | int | Sequence[int | str] | None, n_layers: int, *, embed: bool = False) -> list[int]:
    """Layer indices from a spec: 'all', 'embed', '5', '3-8', '0,4,8', '-1', or a list; sorted, unique.

    'all' means every block output, plus the embeddings when `embed` is true.
    """
    if spec is None or spec == "all":
        return ([EMBED] if embed else []) + list(range(n_layers))
    items: Iterable[Any] = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if text in ("embed", "embeddings", "-1"):
            out.add(EMBED)
        elif text == "all":
            out.update(range(n_layers))
        elif re.fullmatch(r"\d+-\d+", text):
            lo, hi = map(int, text.split("-"))
            if lo > hi:
                raise ConfigError(f"layer range '{text}' is empty (write low-high)")
            out.update(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", text):
            out.add(int(text))
        else:
            raise ConfigError(f"bad layer spec '{text}' (accepted: all, embed, 5, 3-8, 0,4,8)")
    bad = [k for k in out if k != EMBED and not 0 <= k < n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} out of range: the model has blocks 0..{n_layers - 1} (and -1/embed)")
    if not out:
        raise ConfigError(f"layer spec {spec!r} names no layer")
    return sorted(out)


def block_output(output: Any) -> Any:
    """The hidden-state tensor of a block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_output(output: Any, hidden: Any) -> Any:
    """`output` with its hidden-state tensor replaced (keeps tuple extras such as attention weights)."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden
