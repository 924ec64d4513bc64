"""The aligner on real speech (espeak-ng, word boundaries known), on noise, on other scripts."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from text import aligner
from text.pronounce import number_words, pronounce, spelled
from tools import speech_corpus

RATE = speech_corpus.RATE


@pytest.fixture(scope="module")
def corpus() -> list[speech_corpus.SpokenSentence]:
    if not speech_corpus.espeak_available():
        pytest.fail("espeak-ng is missing: `make test` installs it (apt-get install espeak-ng)")
    return speech_corpus.build()


def test_word_starts_on_espeak_speech(corpus):
    errors: list[float] = []
    for sentence in corpus:
        timing = aligner.align_chunk([(0, sentence.text)], sentence.audio, RATE)
        assert timing.method == "aligned", sentence.text
        assert [word.text for word in timing.words] == sentence.text.split()
        errors += speech_corpus.start_errors_ms(sentence, [word.start for word in timing.words])
    median = statistics.median(errors)
    p95 = float(np.percentile(errors, 95))
    print(f"\naligner on espeak-ng speech: {len(errors)} words, start error median {median:.1f} ms, p95 {p95:.1f} ms")
    assert len(errors) >= 100
    assert median <= 60
    assert p95 <= 150


def test_estimate_without_aligner_is_much_worse(corpus):
    """The baseline the aligner must beat: times shared out by length over the speech span."""
    errors: list[float] = []
    for sentence in corpus:
        timing = aligner.estimate_chunk([(0, sentence.text)], sentence.audio, RATE)
        errors += speech_corpus.start_errors_ms(sentence, [word.start for word in timing.words])
    print(f"\nestimate by length: median {statistics.median(errors):.1f} ms, p95 {np.percentile(errors, 95):.1f} ms")
    assert statistics.median(errors) > 60


def test_sentences_come_from_the_same_alignment(corpus):
    first, second = corpus[0], corpus[1]
    gap = np.zeros(RATE // 2, dtype=np.float32)
    audio = np.concatenate([first.audio, gap, second.audio])
    timing = aligner.align_chunk([(0, first.text), (1, second.text)], audio, RATE)
    assert [s.text for s in timing.sentences] == [first.text, second.text]
    assert [s.speaker for s in timing.sentences] == [0, 1]
    boundary = len(first.text.split())
    assert timing.sentences[0].end == timing.words[boundary - 1].end
    assert timing.sentences[1].start == timing.words[boundary].start
    expected = (first.audio.size + gap.size) / RATE + second.starts[0]
    assert abs(timing.sentences[1].start - expected) <= 0.06


def test_noise_still_gives_every_word_in_order_inside_the_audio():
    """What the tiny checkpoint produces: the words are estimated, never lost."""
    noise = np.random.default_rng(0).normal(0, 0.1, RATE * 2).astype(np.float32)
    text = "Hello there, Zorblax! It's 42 degrees - isn't it? [laughs] Fine."
    timing = aligner.align_chunk([(0, text)], noise, RATE)
    assert timing.method in ("aligned", "estimated")
    assert [word.text for word in timing.words] == ["Hello", "there,", "Zorblax!", "It's", "42", "degrees -", "isn't",
                                                    "it?", "[laughs]", "Fine."]  # fmt: skip
    starts = [word.start for word in timing.words]
    assert starts == sorted(starts)
    assert all(0 <= word.start <= word.end <= 2.0 for word in timing.words)


def test_silence_and_empty_audio_are_well_formed():
    for audio in (np.zeros(RATE, dtype=np.float32), np.zeros(0, dtype=np.float32)):
        timing = aligner.align_chunk([(0, "Nothing was said.")], audio, RATE)
        assert [word.text for word in timing.words] == ["Nothing", "was", "said."]
        assert all(0 <= word.start <= word.end <= audio.size / RATE for word in timing.words)


def test_chinese_gets_sentence_timings_only():
    audio = np.random.default_rng(1).normal(0, 0.1, RATE * 3).astype(np.float32)
    timing = aligner.align_chunk([(0, "你好，世界。今天天气很好。")], audio, RATE)
    assert timing.method == "sentences"
    assert timing.words == ()
    assert [s.text for s in timing.sentences] == ["你好，世界。", "今天天气很好。"]
    assert 0 <= timing.sentences[0].start < timing.sentences[0].end == timing.sentences[1].start
    assert timing.sentences[1].end <= 3.0


def test_tokens_keep_punctuation_with_their_word():
    tokens, sentences = aligner.tokenize([(0, "— Well, “quoted” words - and 3.14!"), (1, "Yes.")])
    assert [token.text for token in tokens] == ["— Well,", "“quoted”", "words -", "and", "3.14!", "Yes."]
    assert [token.key for token in tokens] == ["well", "quoted", "words", "and", "3.14", "yes"]
    assert [token.speaker for token in tokens] == [0, 0, 0, 0, 0, 1]
    assert sentences == [("— Well, “quoted” words - and 3.14!", 0), ("Yes.", 1)]


def test_pronunciations_outside_the_dictionary():
    known = {"nine": "N AY N", "teen": "T IY N", "run": "R AH N"}.get
    assert number_words("1969") == ["nineteen", "sixty", "nine"]
    assert number_words("2005") == ["two", "thousand", "five"]
    assert number_words("1905") == ["nineteen", "oh", "five"]
    assert number_words("1234567") == ["one", "million", "two", "hundred", "thirty", "four", "thousand", "five",
                                       "hundred", "sixty", "seven"]  # fmt: skip
    assert pronounce("9", known) == "N AY N"
    assert pronounce("runs", known) == "R AH N Z"
    assert spelled("shape") == "SH AE P"
    assert spelled("zorblax") == "Z AO R B L AE K S"


def test_a_killed_process_costs_no_words(corpus):
    sentence = corpus[1]
    turns = [(0, sentence.text)]
    service = aligner.Aligner(RATE)
    try:
        assert service.result(service.submit(turns, sentence.audio), turns, sentence.audio).method == "aligned"
        for process in list(service._children.values()):
            process.kill()
            process.wait()
        after = service.result(service.submit(turns, sentence.audio), turns, sentence.audio)
        assert [word.text for word in after.words] == sentence.text.split()  # aligned by a new process
        assert after.method == "aligned"
    finally:
        service.close()
    assert not service._children


@pytest.mark.slow
def test_background_process_gives_the_same_result(corpus):
    sentence = corpus[2]
    service = aligner.Aligner(RATE)
    try:
        future = service.submit([(0, sentence.text)], sentence.audio)
        remote = service.result(future, [(0, sentence.text)], sentence.audio)
    finally:
        service.close()
    local = aligner.align_chunk([(0, sentence.text)], sentence.audio, RATE)
    assert remote.words == local.words
    assert remote.method == "aligned"
