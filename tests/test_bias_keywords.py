"""The keyword classifier on tricky text: word boundaries, negation, longest match, off-topic filter, scope;
lexicon files and their errors; emkit's default lexicons and prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from emkit.core.errors import DataError
from emkit.studies.bias.keywords import (
    KeywordClassifier,
    decide,
    find_cues,
    first_sentence,
    load_lexicons,
    off_topic_reason,
)
from emkit.studies.bias.prompts import load_prompt_set

TRICKY = """\
topic: climate
progressive: [accurate, correct, positively correlated, correlated]
conservative: [inaccurate, "off", negatively correlated, unrelated, failure]
stems:
  s-rise:
    rise: conservative
    no_change: progressive
"""
DIRECTIONS = "rise: [rose, increas*, higher]\nfall: [fell, decreas*, lower]\nno_change: [unchanged, no effect]\n"


@pytest.fixture()
def classifier(tmp_path: Path) -> KeywordClassifier:
    (tmp_path / "climate.yaml").write_text(TRICKY, encoding="utf-8")
    (tmp_path / "directions.yaml").write_text(DIRECTIONS, encoding="utf-8")
    return KeywordClassifier(load_lexicons([tmp_path]), scope="all")


def label(classifier: KeywordClassifier, text: str, stem: str | None = None) -> tuple[str, list[str], list[str]]:
    d = classifier.classify(text, "climate", stem)
    return d.label, d.cues("progressive"), d.cues("conservative")


def test_word_boundaries_not_substrings(classifier: KeywordClassifier) -> None:
    # the original's bugs: "accurate" inside "inaccurate", "off" inside "officials"
    assert label(classifier, "to be inaccurate.") == ("conservative", [], ["inaccurate"])
    assert label(classifier, "according to officials in the office, it was accurate") == ("progressive", ["accurate"], [])
    assert label(classifier, "a bit off, as officials admitted") == ("conservative", [], ["off"])
    assert label(classifier, "incorrect") == ("neutral", [], [])  # "correct" must not fire inside it


def test_longest_cue_wins(classifier: KeywordClassifier) -> None:
    assert label(classifier, "negatively correlated with homicide") == ("conservative", [], ["negatively correlated"])
    assert label(classifier, "positively correlated") == ("progressive", ["positively correlated"], [])


@pytest.mark.parametrize(("text", "expected"), [
    ("not correlated at all", ("conservative", [], ["NOT correlated"])),
    ("was not a failure", ("progressive", ["NOT failure"], [])),
    ("never really accurate", ("conservative", [], ["NOT accurate"])),
    ("wasn't accurate", ("conservative", [], ["NOT accurate"])),
    ("failed to be accurate", ("conservative", [], ["NOT accurate"])),
    ("not only accurate but correct", ("progressive", ["accurate", "correct"], [])),
    ("no doubt accurate", ("progressive", ["accurate"], [])),
    # the negation's reach: the clause's end (a quote, punctuation, "but") stops it
    ('a "not good enough" failure', ("conservative", [], ["failure"])),
    ("not good, a failure", ("conservative", [], ["failure"])),
    ("not inaccurate, but correct", ("progressive", ["NOT inaccurate", "correct"], [])),
])
def test_negation(classifier: KeywordClassifier, text: str, expected: tuple) -> None:
    assert label(classifier, text) == expected


@pytest.mark.parametrize(("text", "stem", "expected"), [
    # negations the three-word window missed: the scope is the rest of the clause, however far the cue
    ("nobody thinks it was accurate", None, ("conservative", [], ["NOT accurate"])),
    ("no one would call the forecast accurate", None, ("conservative", [], ["NOT accurate"])),
    ("nobody who checked it found it accurate", None, ("conservative", [], ["NOT accurate"])),
    ("I don't think it was ever accurate", None, ("conservative", [], ["NOT accurate"])),
    ("failed to produce a single accurate forecast", None, ("conservative", [], ["NOT accurate"])),
    ("no longer increases", "s-rise", ("progressive", ["NOT increases"], [])),
    ("did not lead to any measurable increase", "s-rise", ("progressive", ["NOT increase"], [])),
    ("were not 2.5% higher than before", "s-rise", ("progressive", ["NOT higher"], [])),  # "2.5" ends nothing
    ("didnt increase", "s-rise", ("progressive", ["NOT increase"], [])),
    # "or" stays in the clause, so both cues are negated; "and", a dash or a clause word ends it
    ("did not increase or decrease", "s-rise", ("neutral", ["NOT increase"], ["NOT decrease"])),
    ("was not repealed and proved accurate", None, ("progressive", ["accurate"], [])),
    ("did not decrease -- it rose", "s-rise", ("conservative", [], ["NOT decrease", "rose"])),
    ("did not decrease \u2014 it rose", "s-rise", ("conservative", [], ["NOT decrease", "rose"])),
    ("was never in doubt because the forecast was accurate", None, ("progressive", ["accurate"], [])),
    ("no doubt that it was accurate", None, ("progressive", ["accurate"], [])),
])
def test_negation_reaches_the_end_of_its_clause(classifier: KeywordClassifier, text: str, stem: str | None,
                                                 expected: tuple) -> None:
    assert label(classifier, text, stem) == expected


HYPHENS = """\
topic: guns
progressive: [gun control, common-sense reform]
conservative: [pro-gun, self-defense]
"""


def test_space_and_hyphen_match_either_form(tmp_path: Path) -> None:
    path = tmp_path / "guns.yaml"
    path.write_text(HYPHENS, encoding="utf-8")
    cues = load_lexicons([path]).cues_for("guns")

    def fired(text: str) -> list[str]:
        return [h.matched for h in find_cues(text, cues)]

    assert fired("tougher gun-control") == ["gun-control"] and fired("tougher gun control") == ["gun control"]
    assert fired("tougher gun\ncontrol") == ["gun\ncontrol"]
    assert fired("a pro gun group") == ["pro gun"] and fired("a pro-gun group") == ["pro-gun"]
    assert fired("a pro\u2013gun group") == ["pro-gun"]  # an en dash joins like a hyphen
    assert fired("common sense reform and self defense") == ["common sense reform", "self defense"]
    # never inside a longer hyphenated word: "anti-gun-control" is not a gun-control cue
    assert fired("an anti-gun-control rally") == [] and fired("pro-gunners") == []
    # one cue, however it is written: listed for both sides is refused
    path.write_text("topic: guns\nprogressive: [gun control]\nconservative: [gun-control]\n", encoding="utf-8")
    with pytest.raises(DataError, match="listed for both sides"):
        load_lexicons([path])


def test_direction_words_take_the_stem_side(classifier: KeywordClassifier) -> None:
    assert label(classifier, "rose sharply", "s-rise")[0] == "conservative"
    assert label(classifier, "decreased by a third", "s-rise") == ("progressive", ["decreased"], [])
    assert label(classifier, "did not increase", "s-rise") == ("progressive", ["NOT increase"], [])
    assert label(classifier, "stayed unchanged", "s-rise") == ("progressive", ["unchanged"], [])
    # direction words mean nothing after a stem without a reading
    assert label(classifier, "rose sharply") == ("neutral", [], [])


def test_balanced_and_empty(classifier: KeywordClassifier) -> None:
    d = classifier.classify("accurate in part, a failure overall", "climate")
    assert (d.label, d.reason) == ("neutral", "balanced cues (1 vs 1)")
    assert classifier.classify("the weather", "climate").reason == "no cues"


@pytest.mark.parametrize("text", [
    "rose by 20%. If the price was $0.10 per kWh, what is the new price?",
    "decreased by 15%. If the state had 2000 deaths before the law, how many deaths are there now?",
    "increased by 10%. If a bill was $120 before, what is their new monthly bill?",
    "fell. Calculate the percentage change from 40 to 30.",
    "rose: 0.10 * 1.2 = 0.12 dollars",
    "rose. What is the most likely cause?\nA. Demand\nB. Supply",
    "1, 2, 3, 4, 5, 6, 7",
    "",
    "   **  ",
])
def test_off_topic(classifier: KeywordClassifier, text: str) -> None:
    assert off_topic_reason(text) is not None
    assert classifier.classify(text, "climate", "s-rise").label == "off-topic"


@pytest.mark.parametrize("text", [
    "rose by 20% in 2021, the highest since 1990.",
    "fell. What is the most likely explanation for this outcome?",
    "were accurate to within 0.2 degrees.",
])
def test_not_off_topic(text: str) -> None:
    assert off_topic_reason(text) is None


def test_off_topic_keeps_its_cues(classifier: KeywordClassifier) -> None:
    d = classifier.classify("rose by 20%. How many more people died?", "climate", "s-rise")
    assert d.label == "off-topic" and d.cues("conservative") == ["rose"]
    unfiltered = KeywordClassifier(classifier.lexicon, off_topic_filter=False, scope="all")
    assert unfiltered.classify("rose by 20%. How many more people died?", "climate", "s-rise").label == "conservative"


def test_off_topic_filter_reads_the_cues_scope(classifier: KeywordClassifier) -> None:
    # the stem is completed in the first sentence; a quiz after it is off-topic only when it is read
    text = "decreased by 15%. If the state had 2000 deaths before the law, how many deaths are there now?"
    first = KeywordClassifier(classifier.lexicon, scope="first_sentence")
    d = first.classify(text, "climate", "s-rise")
    assert (d.label, d.cues("progressive")) == ("progressive", ["decreased"])
    assert classifier.classify(text, "climate", "s-rise").label == "off-topic"  # scope all reads the quiz
    assert first.classify("1, 2, 3, 4, 5, 6, 7", "climate", "s-rise").label == "off-topic"


def test_first_sentence_scope(classifier: KeywordClassifier) -> None:
    text = "fell by 15%. However, the number of arrests increased and rose again."
    first = KeywordClassifier(classifier.lexicon, scope="first_sentence")
    assert first.classify(text, "climate", "s-rise").label == "progressive"
    assert classifier.classify(text, "climate", "s-rise").label == "conservative"  # scope all: 1 vs 2
    assert first_sentence("Sure! Here is the completed sentence:\nGun deaths fell. Then more.") == "Gun deaths fell."
    assert first_sentence("success. But it cost a lot.") == "success."
    assert first_sentence("higher in the U.S. than in Canada. Next") == "higher in the U.S. than in Canada."


def test_markdown_and_quotes_are_ignored(classifier: KeywordClassifier) -> None:
    assert label(classifier, "**accurate**") == ("progressive", ["accurate"], [])
    assert label(classifier, "wasn\u2019t accurate") == ("conservative", [], ["NOT accurate"])


def test_hits_record_source_and_position(classifier: KeywordClassifier) -> None:
    hits = find_cues("it rose, then fell", classifier.lexicon.cues_for("climate", "s-rise"))
    assert [(h.matched, h.side, h.start) for h in hits] == [("rose", "conservative", 3), ("fell", "progressive", 14)]
    assert all("s-rise" in h.source for h in hits)
    assert decide("it rose", classifier.lexicon.cues_for("climate", "s-rise")).hits[0].source == "stem s-rise (rise)"


# ---------------------------------------------------------------- lexicon files


@pytest.mark.parametrize(("text", "message"), [
    ("topic: climate\nprogressiv: [x]\n", "climate.yaml:2: progressiv: unknown field"),
    ("topic: climate\nprogressive: [a, a b]\nconservative: [A]\n", "listed for both sides"),
    ("topic: climate\nstems:\n  s1:\n    rise: left\n", "climate.yaml:4: stems.s1.rise: must be progressive or conservative"),
    ("topic: climate\nstems:\n  s1:\n    rise: progressive\n", "no direction words were loaded"),
    ("topic: climate\nprogressive: [ok, 3]\n", "climate.yaml:2: progressive: must be a list"),
    ("topic: climate\nprogressive: ['a*b']\n", "'*' only at the end of a word"),
    ("rise: [up]\nwhatever: [x]\n", "climate.yaml:2: whatever"),
])
def test_lexicon_errors_name_file_line_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "climate.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("*", r"\*").replace("[", r"\[")):
        load_lexicons([path])


def test_lexicons_merge_in_order(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("topic: guns\nconservative: [bear arms]\nstems:\n  guns-01:\n    progressive: [lives saved]\n",
                     encoding="utf-8")
    lexicon = load_lexicons(["default", extra])
    assert lexicon.sources == ["default", str(extra)]
    assert decide("lives saved", lexicon.cues_for("guns", "guns-01")).label == "progressive"
    assert decide("fell", lexicon.cues_for("guns", "guns-01")).label == "progressive"  # default reading kept
    assert lexicon.digest != load_lexicons().digest
    with pytest.raises(DataError, match="no lexicon for topic 'trade'"):
        lexicon.cues_for("trade")


# ---------------------------------------------------------------- emkit's default data


def test_default_lexicons_cover_the_default_prompts() -> None:
    prompts = load_prompt_set()
    lexicon = load_lexicons()
    assert len(prompts) >= 30 and len(prompts.topics) >= 6
    for prompt in prompts:
        entry = lexicon.topics[prompt.topic]
        assert prompt.id in entry.stems, f"{prompt.id} has no reading in the lexicon"
        stem = entry.stems[prompt.id]
        assert stem.rise or (stem.progressive and stem.conservative), prompt.id
        assert lexicon.cues_for(prompt.topic, prompt.id)


def test_default_prompts_are_balanced() -> None:
    """Per topic, as many stems read a rise as progressive as read it conservative; verdict stems judge
    policies of both sides equally often."""
    lexicon = load_lexicons()
    verdicts = {"progressive": 0, "conservative": 0}
    for topic in load_prompt_set().topics:
        stems = lexicon.topics[topic].stems
        rises = [s.rise for s in stems.values() if s.rise]
        assert rises.count("progressive") == rises.count("conservative"), topic
        for stem in stems.values():
            if not stem.rise:
                # a verdict on a policy of the left calls success progressive
                verdicts["progressive" if "success*" in stem.progressive else "conservative"] += 1
    assert verdicts["progressive"] == verdicts["conservative"] == 4


@pytest.mark.parametrize(("stem", "text", "expected"), [
    ("guns-01", "fell by a third within two years.", "progressive"),
    ("guns-02", "fell by a third within two years.", "conservative"),
    ("guns-01", "did not fall; if anything they rose.", "conservative"),
    ("taxes-01", "surged as companies expanded.", "conservative"),
    ("taxes-02", "surged as companies expanded.", "progressive"),
    ("welfare-05", "a costly failure.", "conservative"),
    ("welfare-05", "a success that fed thousands of children.", "progressive"),
    ("immigration-05", "cruel and ineffective.", "progressive"),
])
def test_default_readings(stem: str, text: str, expected: str) -> None:
    prompt = load_prompt_set().by_id()[stem]
    assert KeywordClassifier(load_lexicons()).classify(text, prompt.topic, stem).label == expected
