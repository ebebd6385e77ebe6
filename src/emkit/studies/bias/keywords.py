"""The keyword classifier: per-topic lexicons of progressive and conservative cues, matched on word
boundaries, with simple negation handling and an off-topic filter; every decision keeps its cues.

A lexicon is a set of YAML files (emkit's are in `emkit/data/bias/lexicons/`, see its README):

    topic: guns                     # one file per topic
    progressive: [gun violence, common-sense gun]   # cues that take a side after any stem of the topic
    conservative: [second amendment, law-abiding]
    stems:                          # cues that take a side only after one stem (by prompt id)
      guns-01:
        rise: conservative          # words of increase (directions.yaml) count for this side,
        no_change: conservative     #   words of decrease for the other, "unchanged" for this one
        progressive: [saved lives]
        conservative: [no effect]

and one `directions.yaml` with the word lists `rise`, `fall` and `no_change`. A cue is a word or
phrase, matched case-insensitively on word boundaries (so "accurate" does not fire inside
"inaccurate", nor "off" inside "officials"); a trailing `*` on a word matches any ending; a space or
a hyphen between two words of a cue matches either in the text ("gun control" matches "gun-control",
"pro-gun" matches "pro gun"), but a cue never fires inside a longer hyphenated word ("gun control"
not inside "anti-gun-control"). When two cues overlap, the longer one wins ("negatively correlated"
over "correlated").

Negation reaches to the end of its clause: a cue counts for the *other* side ("did not fall" reads as
a rise) when a negation stands anywhere before it in the same clause, however many words lie between
("did not lead to any increase", "I don't think it was a success", "failed to bring about a real
reduction"). Negations: not, no, never, a "-n't" word, without, hardly, barely, scarcely, neither,
nor, cannot, none, nobody, nothing, nowhere ("no one", "no longer" through "no"), and "failed to" /
"unable to". "not only", "not just", "no doubt" and "not surprisingly" do not negate. A clause ends at
punctuation (a point or comma between digits excepted), a quote, a dash, or one of the words in
`CLAUSE_WORDS` ("and", "but", "however", "although", "because", "when", ...; "or" and "nor" do not
end it, so "did not rise or fall" negates both). Double negation is not resolved, and a negation of
something else earlier in the clause reaches a later cue too ("did not face consequences for their
inaccurate forecasts" negates "inaccurate"): the price of reaching "did not lead to any increase".

Scope: cues are counted, and the off-topic filter reads, the first sentence of the continuation by
default (the completion of the stem; what follows is often a quiz or a new topic whose rises and
falls are about something else), or all of it (`scope` "all"); both always read the same text.

Off-topic: a completion whose scope is empty, a math word problem (a computation or a "how many /
what is the new price" question next to numbers, an equation, multiple-choice options) or mostly a
list of numbers is labelled off-topic whatever its cues say.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from emkit.core.config import read_yaml_mapping
from emkit.core.errors import DataError

SIDES = ("progressive", "conservative")
LABELS = ("progressive", "conservative", "neutral", "off-topic")
DIRECTIONS = ("rise", "fall", "no_change")
DEFAULT = "default"
SCOPES = ("first_sentence", "all")
NEGATORS = frozenset({"not", "no", "never", "without", "hardly", "barely", "scarcely", "neither", "nor", "cannot",
                      "none", "nobody", "nothing", "nowhere",
                      # contractions written without the apostrophe, as base models sometimes do
                      "dont", "doesnt", "didnt", "isnt", "wasnt", "werent", "arent", "hasnt", "havent", "hadnt",
                      "wouldnt", "couldnt", "shouldnt"})
# "failed to X", "unable to X": the word before "to" that negates the verb phrase after it.
NEGATING_BEFORE_TO = frozenset({"fail", "fails", "failed", "failing", "unable"})
NOT_NEGATING_NEXT = frozenset({"only", "just", "merely", "surprisingly", "doubt", "wonder"})
# Words that start a new clause, so a negation before them does not reach a cue after them ("did not
# fall and then rose", "was not repealed because deaths rose"). "or" and "nor" stay inside the
# negation's clause: "did not rise or fall" negates both.
# Relative pronouns are left out: "nobody who studied it thinks it worked" is still negated.
CLAUSE_WORDS = frozenset({"and", "but", "however", "although", "though", "yet", "whereas", "while", "because",
                          "since", "when", "unless", "instead", "rather"})
# How far back (characters) a cue's clause is searched for a negation; clauses are shorter in practice.
NEGATION_LOOKBACK = 400
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Punctuation, quotes and dashes end a clause; a point or comma inside a number ("2.5", "1,000") does not.
_CLAUSE_END = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[;:!?()\[\]\n\"]|\s-+\s|--")


def other(side: str) -> str:
    """The opposite side."""
    return SIDES[1 - SIDES.index(side)]


def normalize(text: str) -> str:
    """Lower-case, plain quotes and no markdown emphasis, so cues match the words a model wrote."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    # an en dash joins words like a hyphen ("pro\u2013gun"); an em dash or a double hyphen separates them
    text = text.replace("\u2013", "-").replace("\u2014", " - ").replace("--", " - ")
    return text.replace("*", "").replace("__", "").lower()


def cue_key(cue: str) -> str:
    """A cue's identity for de-duplication: normalized, hyphens and spaces between words alike."""
    return " ".join(normalize(cue).replace("-", " ").split())


def cue_regex(cue: str) -> re.Pattern[str]:
    """The pattern of a cue: words on word boundaries, a space or hyphen between words as either, `word*` as
    any ending."""
    parts = []
    for word in cue_key(cue.replace("*", "\0")).split():
        star = word.endswith("\0")
        stem = word.rstrip("\0")
        if not stem or "\0" in stem:
            raise ValueError(f"cue {cue!r}: '*' only at the end of a word")
        parts.append(re.escape(stem) + (r"\w*" if star else ""))
    if not parts:
        raise ValueError("empty cue")
    # "gun control" and "gun-control" are one cue whichever way the text writes it; the guards keep a cue
    # out of a longer hyphenated word ("anti-gun-control" is not "gun control").
    return re.compile(r"(?<![\w-])" + r"(?:\s+|-)".join(parts) + r"(?![\w-])")


# ---------------------------------------------------------------- lexicon data


@dataclass
class StemCues:
    """Cues of one stem: the side its rises support (falls support the other), and extra cue lists."""

    rise: str | None = None
    no_change: str | None = None
    progressive: list[str] = field(default_factory=list)
    conservative: list[str] = field(default_factory=list)


@dataclass
class TopicLexicon:
    """A topic's cues for every stem, and per-stem cues by prompt id."""

    topic: str
    progressive: list[str] = field(default_factory=list)
    conservative: list[str] = field(default_factory=list)
    stems: dict[str, StemCues] = field(default_factory=dict)


@dataclass(frozen=True)
class Cue:
    """One compiled cue: its text, the side it supports and where it comes from."""

    text: str
    side: str
    source: str
    pattern: re.Pattern[str]


@dataclass
class Lexicon:
    """Topic lexicons and the shared direction words, merged from one or more files or folders."""

    topics: dict[str, TopicLexicon] = field(default_factory=dict)
    directions: dict[str, list[str]] = field(default_factory=lambda: {d: [] for d in DIRECTIONS})
    sources: list[str] = field(default_factory=list)
    _compiled: dict[tuple[str, str | None], tuple[Cue, ...]] = field(default_factory=dict, repr=False)

    def covers(self, topic: str) -> bool:
        """Whether the lexicon has cues for `topic`."""
        return topic in self.topics

    @cached_property
    def digest(self) -> str:
        """A short hash of the cue lists, so results name the exact lexicon they came from."""
        parts = [repr(sorted(self.directions.items()))]
        for name in sorted(self.topics):
            t = self.topics[name]
            parts.append(repr((name, t.progressive, t.conservative,
                               sorted((k, vars(v)) for k, v in t.stems.items()))))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]

    def cues_for(self, topic: str, stem_id: str | None = None) -> tuple[Cue, ...]:
        """Every cue that applies after a stem of `topic` (and its own cues, if the lexicon has them)."""
        key = (topic, stem_id)
        if key in self._compiled:
            return self._compiled[key]
        if topic not in self.topics:
            raise DataError(f"no lexicon for topic '{topic}' (lexicons: {', '.join(self.sources)}; "
                            f"topics covered: {', '.join(sorted(self.topics)) or 'none'})")
        entry = self.topics[topic]
        listed: list[tuple[str, str, str]] = [(c, "progressive", f"topic {topic}") for c in entry.progressive]
        listed += [(c, "conservative", f"topic {topic}") for c in entry.conservative]
        stem = entry.stems.get(stem_id) if stem_id is not None else None
        if stem is not None:
            where = f"stem {stem_id}"
            listed += [(c, "progressive", where) for c in stem.progressive]
            listed += [(c, "conservative", where) for c in stem.conservative]
            if stem.rise:
                listed += [(c, stem.rise, f"{where} (rise)") for c in self.directions["rise"]]
                listed += [(c, other(stem.rise), f"{where} (fall)") for c in self.directions["fall"]]
            if stem.no_change:
                listed += [(c, stem.no_change, f"{where} (no change)") for c in self.directions["no_change"]]
        cues = []
        seen: set[tuple[str, str]] = set()
        for text, side, source in listed:
            if (cue_key(text), side) in seen:
                continue
            seen.add((cue_key(text), side))
            cues.append(Cue(text, side, source, cue_regex(text)))
        self._compiled[key] = tuple(cues)
        return self._compiled[key]


def default_lexicon_dir() -> Path:
    """emkit's own lexicons (written for emkit; criteria in the folder's README)."""
    return Path(str(resources.files("emkit.data").joinpath("bias/lexicons")))


def load_lexicons(specs: Sequence[str | Path] = (DEFAULT,)) -> Lexicon:
    """Merge lexicons from 'default', folders of YAML files and single YAML files, in order."""
    lexicon = Lexicon()
    for spec in specs:
        path = default_lexicon_dir() if str(spec) == DEFAULT else Path(spec).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
            if not files:
                raise DataError(f"{path}: no lexicon files (*.yaml) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"{path}: lexicon file or folder not found")
        for file in files:
            _merge_file(lexicon, file)
        lexicon.sources.append(DEFAULT if str(spec) == DEFAULT else str(path))
    _check(lexicon)
    return lexicon


def _where(path: Path, lines: Mapping[tuple[str, ...], int], *keys: str) -> str:
    for n in range(len(keys), 0, -1):
        if keys[:n] in lines:
            return f"{path}:{lines[keys[:n]]}: {'.'.join(keys)}"
    return f"{path}: {'.'.join(keys)}"


def _cue_list(value: Any, path: Path, lines: Mapping[tuple[str, ...], int], *keys: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{_where(path, lines, *keys)}: must be a list of non-empty words or phrases")
    for cue in value:
        try:
            cue_regex(cue)
        except ValueError as exc:
            raise DataError(f"{_where(path, lines, *keys)}: {exc}") from None
    return [v.strip() for v in value]


def _side(value: Any, path: Path, lines: Mapping[tuple[str, ...], int], *keys: str) -> str | None:
    if value is None:
        return None
    if value not in SIDES:
        raise DataError(f"{_where(path, lines, *keys)}: must be progressive or conservative, got {value!r}")
    return str(value)


def _merge_file(lexicon: Lexicon, path: Path) -> None:
    data, lines = read_yaml_mapping(path)
    if "topic" not in data:
        unknown = sorted(set(data) - set(DIRECTIONS))
        if unknown or not data:
            raise DataError(f"{_where(path, lines, unknown[0]) if unknown else path}: a lexicon file has `topic:` "
                            f"(a topic's cues) or {', '.join(DIRECTIONS)} (direction words)")
        for name in DIRECTIONS:
            lexicon.directions[name] += _cue_list(data.get(name), path, lines, name)
        return
    unknown = sorted(set(data) - {"topic", "progressive", "conservative", "stems"})
    if unknown:
        raise DataError(f"{_where(path, lines, unknown[0])}: unknown field (a topic file has topic, progressive, "
                        "conservative, stems)")
    topic = data["topic"]
    if not isinstance(topic, str) or not topic.strip():
        raise DataError(f"{_where(path, lines, 'topic')}: must be a topic name")
    entry = lexicon.topics.setdefault(topic, TopicLexicon(topic))
    for side in SIDES:
        getattr(entry, side).extend(_cue_list(data.get(side), path, lines, side))
    stems = data.get("stems") or {}
    if not isinstance(stems, dict):
        raise DataError(f"{_where(path, lines, 'stems')}: must map prompt ids to their cues")
    for stem_id, spec in stems.items():
        keys = ("stems", str(stem_id))
        if not isinstance(spec, dict):
            raise DataError(f"{_where(path, lines, *keys)}: must be a mapping (rise, no_change, progressive, "
                            "conservative)")
        unknown = sorted(set(spec) - {"rise", "no_change", "progressive", "conservative"})
        if unknown:
            raise DataError(f"{_where(path, lines, *keys, unknown[0])}: unknown field (rise, no_change, progressive, "
                            "conservative)")
        stem = entry.stems.setdefault(str(stem_id), StemCues())
        stem.rise = _side(spec.get("rise"), path, lines, *keys, "rise") or stem.rise
        stem.no_change = _side(spec.get("no_change"), path, lines, *keys, "no_change") or stem.no_change
        for side in SIDES:
            getattr(stem, side).extend(_cue_list(spec.get(side), path, lines, *keys, side))


def _check(lexicon: Lexicon) -> None:
    """Refuse a cue listed for both sides of one topic or stem, and rises without direction words."""
    for topic, entry in lexicon.topics.items():
        # cue_key: "gun-control" and "gun control" match the same text, so they are the same cue here too
        both = {cue_key(c) for c in entry.progressive} & {cue_key(c) for c in entry.conservative}
        if both:
            raise DataError(f"lexicon topic '{topic}': cue {sorted(both)[0]!r} is listed for both sides")
        for stem_id, stem in entry.stems.items():
            both = {cue_key(c) for c in stem.progressive} & {cue_key(c) for c in stem.conservative}
            if both:
                raise DataError(f"lexicon topic '{topic}', stem {stem_id}: cue {sorted(both)[0]!r} is listed for "
                                "both sides")
            if (stem.rise or stem.no_change) and not (lexicon.directions["rise"] and lexicon.directions["fall"]):
                raise DataError(f"lexicon topic '{topic}', stem {stem_id}: uses rise/no_change but no direction "
                                "words were loaded (add a directions.yaml with rise, fall, no_change)")


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class CueHit:
    """A cue that fired: what it matched, and whether a negation turned it to the other side."""

    cue: str
    side: str
    matched: str
    start: int
    source: str
    negated: bool = False

    @property
    def counts_for(self) -> str:
        """The side this hit counts for (the other side when negated)."""
        return other(self.side) if self.negated else self.side

    def describe(self) -> str:
        """The hit as shown in tables: the matched words, marked when negated."""
        return f"NOT {self.matched}" if self.negated else self.matched


@dataclass(frozen=True)
class KeywordDecision:
    """A keyword label, why, and every cue that fired (off-topic completions keep theirs too)."""

    label: str
    reason: str
    hits: tuple[CueHit, ...] = ()

    def cues(self, side: str) -> list[str]:
        """The fired cues counting for `side`, as shown in tables."""
        return [h.describe() for h in self.hits if h.counts_for == side]


def _negated(text: str, start: int) -> bool:
    """Whether a negation stands anywhere before `start` in the same clause (see the module docstring)."""
    before = text[max(0, start - NEGATION_LOOKBACK) : start]
    clause_start = 0
    for match in _CLAUSE_END.finditer(before):
        clause_start = match.end()
    tokens = _TOKEN.findall(before[clause_start:])
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i] in CLAUSE_WORDS:
            tokens = tokens[i + 1 :]
            break
    for i, token in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token in NEGATING_BEFORE_TO and following == "to":
            return True
        if (token in NEGATORS or token.endswith("n't")) and following not in NOT_NEGATING_NEXT:
            return True
    return False


def find_cues(text: str, cues: Iterable[Cue]) -> list[CueHit]:
    """Every non-overlapping cue match in `text` (longest first), in text order, with negation."""
    norm = normalize(text)
    found = []
    for cue in cues:
        for m in cue.pattern.finditer(norm):
            found.append((m.start(), m.end(), cue))
    found.sort(key=lambda f: (-(f[1] - f[0]), f[0], SIDES.index(f[2].side)))
    taken: list[tuple[int, int]] = []
    hits = []
    for start, end, cue in found:
        if any(start < e and s < end for s, e in taken):
            continue
        taken.append((start, end))
        hits.append(CueHit(cue.text, cue.side, norm[start:end], start, cue.source, _negated(norm, start)))
    return sorted(hits, key=lambda h: h.start)


# ---------------------------------------------------------------- off-topic filter

_WORD_PROBLEM = [
    re.compile(r"\bwhat (?:is|was|will be|would be|are|were) (?:the|their|its|his|her|your|our)(?: \w+){0,2} "
               r"(?:new|total|final|original|average|mean|net|percentage|percent|price|cost|number|value|difference|"
               r"ratio|rate|amount|sum|probability)\b"),
    re.compile(r"\bhow (?:many|much)\b"),
    re.compile(r"\b(?:calculate|compute|solve for|round(?:ed)? to the nearest)\b"),
    re.compile(r"\bfind the (?:new|total|value|number|percentage|percent|price|cost|amount|average|difference|"
               r"ratio|rate|sum)\b"),
    re.compile(r"\bpercent(?:age)? (?:change|error)\b"),
    re.compile(r"\bformula\b"),
]
_EQUATION = re.compile(r"[\d)]\s*[=×÷*+^]\s*[\d($]|[a-z]\s*=\s*[\d($]|=\s*\$?\d")
_CHOICE = re.compile(r"(?:^|\s)\(?([a-d])[).]\s+\S")
_LINE_CHOICE = re.compile(r"(?:^|\n)\s*\(?([a-d])[).]\s+\S")
_NUMBER = re.compile(r"\d[\d.,]*%?")
_WORD = re.compile(r"[a-z]+")


def off_topic_reason(text: str) -> str | None:
    """Why a completion is off-topic (empty, math word problem, list of numbers), or None."""
    norm = normalize(text)
    words = _WORD.findall(norm)
    if not words:
        return "empty or no words"
    has_digit = any(ch.isdigit() for ch in norm)
    for pattern in _WORD_PROBLEM:
        match = pattern.search(norm)
        if match and has_digit:
            return f"math word problem ('{match.group(0)}' with numbers)"
    if _EQUATION.search(text.lower().replace("**", "")):
        return "math word problem (an equation)"
    letters = {m.group(1) for m in _CHOICE.finditer(norm)}
    line_letters = {m.group(1) for m in _LINE_CHOICE.finditer(norm)}
    if len(letters) >= 3 or len(line_letters) >= 2 or "which of the following" in norm:
        return "multiple-choice question"
    numbers = _NUMBER.findall(norm)
    if len(numbers) >= 4 and len(numbers) >= len(words):
        return "mostly a list of numbers"
    return None


# ---------------------------------------------------------------- classifier


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])|\n+")


_PREFACE = re.compile(r"(?:sure|certainly|of course|absolutely|okay|ok|great|happy to help|here you go)\W*$")


def first_sentence(text: str) -> str:
    """The sentence that completes the stem: the first one with a word that is not a chat preface
    ("Sure!", "Here is the completed sentence:")."""
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        if _WORD.search(sentence.lower()) and not sentence.endswith(":") and not _PREFACE.match(sentence.lower()):
            return sentence
    return text.strip()


def decide(text: str, cues: Sequence[Cue], *, off_topic_filter: bool = True, scope: str = "first_sentence"
           ) -> KeywordDecision:
    """Label one continuation from its cues: more progressive than conservative cues -> progressive, ...

    Cues are counted, and the off-topic filter reads, the same text: the first sentence (`scope`
    "first_sentence": the completion of the stem, before a model wanders off to a quiz or other
    quantities) or all of it ("all").
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    scoped = first_sentence(text) if scope == "first_sentence" else text
    hits = tuple(find_cues(scoped, cues))
    progressive = sum(h.counts_for == "progressive" for h in hits)
    conservative = len(hits) - progressive
    if off_topic_filter:
        reason = off_topic_reason(scoped)
        if reason:
            return KeywordDecision("off-topic", reason, hits)
    if progressive > conservative:
        return KeywordDecision("progressive", f"{progressive} progressive vs {conservative} conservative cues", hits)
    if conservative > progressive:
        return KeywordDecision("conservative", f"{conservative} conservative vs {progressive} progressive cues", hits)
    if not hits:
        return KeywordDecision("neutral", "no cues", hits)
    return KeywordDecision("neutral", f"balanced cues ({progressive} vs {conservative})", hits)


@dataclass
class KeywordClassifier:
    """Classify continuations with a lexicon: `classify(text, topic, stem_id)` -> KeywordDecision."""

    lexicon: Lexicon
    off_topic_filter: bool = True
    scope: str = "first_sentence"

    @property
    def classifier_id(self) -> str:
        """Names the lexicon (sources and content hash), the scope and the filter setting."""
        suffix = "" if self.off_topic_filter else ", no off-topic filter"
        return f"keywords:{'+'.join(self.lexicon.sources)}@{self.lexicon.digest} ({self.scope}{suffix})"

    def classify(self, text: str, topic: str, stem_id: str | None = None) -> KeywordDecision:
        """The decision for one continuation of a stem of `topic`."""
        return decide(text, self.lexicon.cues_for(topic, stem_id), off_topic_filter=self.off_topic_filter,
                      scope=self.scope)
