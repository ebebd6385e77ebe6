"""Tokenize chat examples with a loss mask covering assistant turns only, and report what is trained.

The mask is computed on the rendered text, not on separately tokenized prefixes: each assistant
turn spans from the end of the chat template's generation prompt to the end of the turn (its
end-of-turn token included, so the model learns to stop). Tokens are assigned by the character
where they start, which stays right even when the tokenizer merges across a turn boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from emkit.core.errors import TrainingError
from emkit.data.chat import Conversation, assistant_char_spans


@dataclass
class MaskReport:
    """What training will actually see: token counts and a few decoded examples."""

    examples: int
    dropped: int  # examples left with no trained token after truncation
    truncated: int
    tokens: int
    trained_tokens: int
    samples: list[str] = field(default_factory=list)

    @property
    def trained_share(self) -> float:
        """Share of all tokens that carry loss."""
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def summary(self) -> str:
        """One line for the console."""
        return (
            f"{self.examples} examples, {self.tokens} tokens, {self.trained_tokens} trained "
            f"({self.trained_share:.1%} on assistant turns); {self.truncated} truncated, "
            f"{self.dropped} dropped with nothing left to train"
        )


def tokenize_conversations(
    conversations: Sequence[Conversation], tokenizer: Any, max_length: int, n_samples: int = 3
) -> tuple[list[dict[str, list[int]]], MaskReport]:
    """Tokenize with assistant-only masks; return trainable rows and the mask report."""
    if tokenizer.chat_template is None:
        raise TrainingError("the tokenizer has no chat template; emkit trains chat models on chat data")
    texts, spans = [], []
    for conv in conversations:
        text, turn_spans = assistant_char_spans(conv.as_list, tokenizer)
        texts.append(text)
        spans.append(turn_spans)
    try:
        all_ids, all_offsets = encode_start(texts, tokenizer, max_length)
    except NotImplementedError:
        raise TrainingError("emkit needs a fast tokenizer (offset mapping) to mask assistant turns") from None
    rows: list[dict[str, list[int]]] = []
    tokens = trained = dropped = truncated = 0
    samples: list[str] = []
    for ids, offsets, turn_spans, conv in zip(all_ids, all_offsets, spans, conversations):
        mask = [int(any(lo <= start < hi for lo, hi in turn_spans)) for start, _ in offsets]
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            dropped += 1
            continue
        rows.append({"input_ids": list(ids), "completion_mask": mask})
        tokens += len(ids)
        trained += sum(mask)
        if len(samples) < n_samples:
            samples.append(f"line {conv.line}: " + render_mask(ids, mask, tokenizer))
    report = MaskReport(len(rows), dropped, truncated, tokens, trained, samples)
    if trained == 0:
        raise TrainingError(
            f"no token would be trained: {report.summary()}. The loss mask covers assistant turns only; "
            "check that the data has assistant answers and that max_length leaves room for them"
        )
    return rows, report


# Tokenizing a text costs memory in proportion to its length (a 1 MB message: hundreds of MB), yet
# training keeps its first max_length tokens only. Texts are therefore tokenized from a cut that
# leaves this many characters per kept token, and cut twice as long while that is not enough.
FIRST_CUT_CHARS_PER_TOKEN = 16


def encode_start(
    texts: Sequence[str], tokenizer: Any, max_length: int
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, up to where its first max_length + 1 tokens are certain."""
    cuts = [min(len(text), (max_length + 1) * FIRST_CUT_CHARS_PER_TOKEN) for text in texts]
    encoded = tokenizer(
        [text[:cut] for text, cut in zip(texts, cuts)], add_special_tokens=False, return_offsets_mapping=True
    )
    all_ids, all_offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    for i, text in enumerate(texts):
        cut = cuts[i]
        # A cut can change how the text just before it is split (a word cut in two), so the tokens
        # kept, and the one after them that tells the text was truncated, must end a quarter of the
        # cut before it; text shorter than the cut is tokenized whole, exactly as before.
        while cut < len(text) and not (
            len(all_offsets[i]) > max_length and all_offsets[i][max_length][1] <= cut - cut // 4
        ):
            cut = min(len(text), 2 * cut)
            one = tokenizer(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
            all_ids[i], all_offsets[i] = one["input_ids"], one["offset_mapping"]
    return all_ids, all_offsets


def render_mask(ids: Sequence[int], mask: Sequence[int], tokenizer: Any, limit: int = 400) -> str:
    """Decode a tokenized example with its trained spans wrapped in [[ ]] (long spans shortened)."""
    parts, current, run = [], None, []
    for token, bit in zip(list(ids) + [None], list(mask) + [None]):
        if bit != current and run:
            piece = tokenizer.decode(run)
            if len(piece) > limit:
                piece = piece[: limit // 2] + " ... " + piece[-limit // 2 :]
            parts.append(f"[[{piece}]]" if current else piece)
            run = []
        current = bit
        if token is not None:
            run.append(token)
    return "".join(parts)
