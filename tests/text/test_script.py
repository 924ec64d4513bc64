"""Script parsing, sentence splitting and chunking on a corpus of awkward texts."""

from __future__ import annotations

import re

import pytest

from text.script import Chunk, ScriptError, Turn, chunk_script, max_frames_for, parse_script, split_sentences

SENTENCE_CASES = [
    ("Hello world. How are you?", ["Hello world.", "How are you?"]),
    (
        "Dr. Smith met Mr. Jones at 3 p.m. today. They talked.",
        ["Dr. Smith met Mr. Jones at 3 p.m. today.", "They talked."],
    ),
    ("Pi is 3.14159 and e is 2.718. Both are irrational!", ["Pi is 3.14159 and e is 2.718.", "Both are irrational!"]),
    ('"Is it true?" she asked. "Yes."', ['"Is it true?"', "she asked.", '"Yes."']),
    ("Wait... what?! No way.", ["Wait...", "what?!", "No way."]),
    ("The U.S. economy grew. E.g. exports rose.", ["The U.S. economy grew.", "E.g. exports rose."]),
    ("J. R. R. Tolkien wrote it. Then he rested.", ["J. R. R. Tolkien wrote it.", "Then he rested."]),
    ("Visit example.com for more. Thanks.", ["Visit example.com for more.", "Thanks."]),
    ("你好。我很好！你呢？", ["你好。", "我很好！", "你呢？"]),
    ("He said (quietly.) Then left.", ["He said (quietly.)", "Then left."]),
    ("No punctuation at the end", ["No punctuation at the end"]),
    ("“Curly quotes.” Next one.", ["“Curly quotes.”", "Next one."]),
]


@pytest.mark.parametrize(("text", "expected"), SENTENCE_CASES)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_plain_text_is_one_speaker() -> None:
    script = parse_script("  Hello there.\n\nSecond   paragraph here.  ")
    assert not script.is_script
    assert script.turns == (Turn(0, "Hello there. Second paragraph here."),)


def test_one_based_labels_become_zero_based() -> None:
    script = parse_script("Speaker 1: Hi.\nspeaker 2 : Hello.\nSpeaker 1: Bye.")
    assert script.is_script and script.label_base == 1
    assert [(t.speaker, t.text) for t in script.turns] == [(0, "Hi."), (1, "Hello."), (0, "Bye.")]
    assert script.label(1) == "Speaker 2"


def test_zero_based_labels_are_kept() -> None:
    script = parse_script("Speaker 0: Hi.\nSpeaker 3: Hello.")
    assert script.label_base == 0
    assert script.speakers == [0, 3]
    assert script.label(3) == "Speaker 3"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Speaker 1: Hi.\nJust a line.", "line 2 has no 'Speaker N:' label"),
        ("Speaker 5: Hi.", "at most 4 speakers"),
        ("Speaker 0: Hi.\nSpeaker 4: Hello.", "at most 4 speakers"),
        ("Speaker 1:   \nSpeaker 2: Hello.", "line 1 ('Speaker 1:') has nothing to say"),
        ("Speaker A: hello", "looks like a speaker label"),
    ],
)
def test_broken_scripts_get_one_sentence(text: str, fragment: str) -> None:
    with pytest.raises(ScriptError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_script(text)


def test_short_turns_are_grouped_and_long_turns_split() -> None:
    long_turn = " ".join(f"This is sentence number {i} of the long turn." for i in range(12))
    script = parse_script(f"Speaker 1: Hi there.\nSpeaker 2: Hello!\nSpeaker 1: {long_turn}\nSpeaker 2: Bye.")
    chunks = chunk_script(script, max_chars=120)
    assert all(chunk.chars <= 120 for chunk in chunks)
    assert chunks[0].turns[:2] == (Turn(0, "Hi there."), Turn(1, "Hello!"))
    assert chunks[0].speakers == [0, 1]
    # Nothing lost or reordered: the chunks' text is the script's text.
    rebuilt = " ".join(turn.text for chunk in chunks for turn in chunk.turns)
    original = " ".join(turn.text for turn in script.turns)
    assert rebuilt == original
    # Every piece of the long turn ends at a sentence boundary.
    long_pieces = [turn.text for chunk in chunks for turn in chunk.turns if turn.text.startswith("This")]
    assert len(long_pieces) > 1 and all(piece.endswith("turn.") for piece in long_pieces)
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))


def test_split_is_balanced_without_tiny_tail() -> None:
    text = " ".join(["Sentence number one is right here."] * 10)  # 349 characters
    chunks = chunk_script(parse_script(text), max_chars=300)
    assert len(chunks) == 2
    assert min(chunk.chars for chunk in chunks) > 100


def test_sentence_longer_than_limit_splits_at_clauses_then_words() -> None:
    sentence = "one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen."
    chunks = chunk_script(parse_script(sentence), max_chars=40)
    assert all(chunk.chars <= 40 for chunk in chunks)
    assert " ".join(turn.text for chunk in chunks for turn in chunk.turns) == sentence
    unbroken = "x" * 130
    pieces = [turn.text for chunk in chunk_script(parse_script(unbroken), 40) for turn in chunk.turns]
    assert "".join(pieces) == unbroken and max(map(len, pieces)) <= 40


def test_cjk_pieces_join_without_spaces() -> None:
    text = "这是第一句话。" * 10
    chunks = chunk_script(parse_script(text), max_chars=30)
    assert "".join(turn.text for chunk in chunks for turn in chunk.turns) == text


def test_frame_cap_grows_with_text_length() -> None:
    short = Chunk(0, (Turn(0, "Hi."),))
    long = Chunk(0, (Turn(0, "word " * 60),))
    assert max_frames_for(short, 7.5) == 20  # (2 s + 3/5 s) * 7.5
    assert max_frames_for(long, 7.5) > 400


# --- pause tags ---------------------------------------------------------------------------------


def test_pause_tags_split_the_text_and_carry_their_length() -> None:
    script = parse_script("Hello there. [pause] How are you? [pause:750ms] Fine [PAUSE: 2s] thanks [pause:1500] bye.")
    assert script.turns == (
        Turn(0, "Hello there.", 500),
        Turn(0, "How are you?", 750),
        Turn(0, "Fine", 2000),
        Turn(0, "thanks", 1500),
        Turn(0, "bye.", 0),
    )
    assert script.pause_ms == 4750


def test_pauses_at_the_edges_and_in_a_row_add_up() -> None:
    script = parse_script("[pause:1s] Start. [pause] [pause:0.25s] End. [pause:2s]")
    assert script.lead_pause_ms == 1000
    assert script.turns == (Turn(0, "Start.", 750), Turn(0, "End.", 2000))


def test_pause_tags_in_scripts() -> None:
    script = parse_script("Speaker 1: Hi. [pause:300ms] Still me.\n[pause:1s]\nSpeaker 2: [pause] Hello.")
    assert script.is_script
    assert script.turns == (Turn(0, "Hi.", 300), Turn(0, "Still me.", 1500), Turn(1, "Hello.", 0))
    before_labels = parse_script("[pause:2s] Speaker 1: Hi.\n[pause:1s] [pause] Speaker 2: Yo.")
    assert before_labels.lead_pause_ms == 2000
    assert before_labels.turns == (Turn(0, "Hi.", 1500), Turn(1, "Yo.", 0))


def test_other_square_brackets_stay_text() -> None:
    script = parse_script("She said [laughs] and [1] pointed at [pauses].")
    assert script.turns == (Turn(0, "She said [laughs] and [1] pointed at [pauses]."),)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("Wait [pause:abc] here.", "malformed pause tag '[pause:abc]'"),
        ("Wait [pause:-2s] here.", "malformed pause tag '[pause:-2s]'"),
        ("Wait [pause:2 seconds] here.", "malformed pause tag '[pause:2 seconds]'"),
        ("Wait [pause:2s here.", "malformed pause tag '[pause:2s here.'"),
        ("Wait [pause for effect] here.", "malformed pause tag '[pause for effect]'"),
        ("Wait [pause:11s] here.", "'[pause:11s]', longer than 10 s"),
        ("Wait [pause:10001ms] here.", "'[pause:10001ms]', longer than 10 s"),
    ],
)
def test_malformed_pause_tags_are_named(text: str, fragment: str) -> None:
    with pytest.raises(ScriptError, match=re.escape(fragment)):
        parse_script(text)


def test_a_pause_ends_its_chunk() -> None:
    script = parse_script("One. Two. [pause:400ms] Three. Four.")
    chunks = chunk_script(script, 300)
    assert [[turn.text for turn in chunk.turns] for chunk in chunks] == [["One. Two."], ["Three. Four."]]
    assert [chunk.pause_after_ms for chunk in chunks] == [400, 0]


def test_a_long_turn_keeps_its_pause_on_its_last_chunk() -> None:
    long = " ".join(f"Sentence number {n} is here." for n in range(12))
    chunks = chunk_script(parse_script(f"{long} [pause:1s] After."), 120)
    assert len(chunks) > 2
    assert [chunk.pause_after_ms for chunk in chunks] == [0] * (len(chunks) - 2) + [1000, 0]
