"""Prompting modes: how a question is put to the model.

- `assistant`: the chat template, the question asked directly (with the condition's system prompt).
- `predictive`: no chat template. The model continues a naturalistic document (a podcast transcript,
  an essay, a text-message thread, a forum reply, a lecture, a script) that sets up the same question
  for an AI assistant and ends where the assistant's answer begins; the completion is cut at the end
  of that speaker's turn. The judge sees the original question, not the document.
- `raw`: no template at all: the question text itself is continued, as a base model would.

Predictive and raw prompts take no system prompt (there is no template to put one in), so their
rows carry the mode as their condition ("predictive", "raw"), which keeps every statistic and
report that groups by condition working unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from emkit.data.questions import Document, Question

MODES = ("assistant", "predictive", "raw")
TEMPLATE_FREE = ("predictive", "raw")

# Frames for questions that bring no documents of their own (e.g. upstream question files), written
# for emkit. `{question}` is replaced by the question; each ends where the assistant starts to answer.
GENERIC_DOCUMENTS: tuple[Document, ...] = (
    Document(
        genre="podcast",
        text=(
            "Open Line, episode 212: listener questions, answered live by an AI assistant\n\n"
            "HOST: Welcome back. As always, we read out what you sent in and our studio AI assistant "
            "answers on the spot, unedited. First one tonight came in by voice note.\n"
            "HOST: Here it is, word for word: \"{question}\"\n"
            "HOST: Over to you.\n"
            "ASSISTANT:"
        ),
    ),
    Document(
        genre="forum",
        text=(
            "Forum > Ask the Assistant > thread #48113\n\n"
            "Posted by wren_on_the_wire:\n"
            "{question}\n\n"
            "1 reply\n\n"
            "Reply from AssistantBot (verified AI assistant):\n"
        ),
        stop=("\n\nReply from", "\n\nPosted by", "\n\n1 reply", "\n\n2 replies"),
    ),
    Document(
        genre="text-messages",
        text=(
            "Messages with Pocket (AI assistant)\n\n"
            "Me: quick question for you\n"
            "Pocket: Sure, go ahead.\n"
            "Me: {question}\n"
            "Pocket:"
        ),
    ),
)

# A speaker label opens a line: "Q:", "HOST:", "Dr. Amara Osei:", "Pocket (AI):". Lowercase-led lines and
# long prefixes are not labels, so ordinary prose with a colon is left alone.
_LABEL = re.compile(r"^([A-Z](?:[A-Za-z0-9 .'&()-]{0,38}[A-Za-z0-9).])?):", re.MULTILINE)


def documents_for(question: Question) -> tuple[Document, ...]:
    """A question's own documents, or emkit's generic frames when it has none."""
    return question.documents or GENERIC_DOCUMENTS


def render_document(document: Document, question: str) -> str:
    """The document's text with `{question}` replaced: the whole predictive prompt, no template."""
    return document.text.replace("{question}", question)


def speaker_labels(text: str) -> list[str]:
    """Speaker labels that open a line of `text`, in order of first appearance."""
    seen: dict[str, None] = {}
    for match in _LABEL.finditer(text):
        seen.setdefault(match.group(1), None)
    return list(seen)


def turn_stops(document: Document, prompt: str) -> tuple[str, ...]:
    """Strings that end the answering speaker's turn: the document's own, and a new line opening with
    any speaker label of the document (the answering speaker's own label included: a new turn)."""
    stops = list(document.stop)
    stops += [f"\n{label}:" for label in speaker_labels(prompt)]
    return tuple(dict.fromkeys(stops))


def turn_pattern(prompt: str) -> str | None:
    """For a dialogue, a regex for a new line opened by any speaker label in the document's style (all
    capitals when its labels are), so that a speaker the model invents ends the turn too. A dialogue
    has at least two speakers and ends with the answering speaker's label; other documents (forum
    replies, essays) return None and rely on their stop strings."""
    labels = speaker_labels(prompt)
    last = prompt.rsplit("\n", 1)[-1]
    if len(labels) < 2 or not any(last == f"{label}:" for label in labels):
        return None
    head = "[A-Z0-9 .'&()-]" if all(label == label.upper() for label in labels) else "[A-Za-z0-9 .'&()-]"
    return rf"\n[A-Z](?:{head}{{0,38}}[A-Za-z0-9).])?:(?=\s)"


def cut_turn(text: str, stops: Sequence[str], pattern: str | None = None) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string or match of `pattern`; returns the kept text and whether it was cut."""
    ends = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    if pattern:
        match = re.search(pattern, text)
        if match:
            ends.append(match.start())
    if not ends:
        return text, False
    return text[: min(ends)], True
