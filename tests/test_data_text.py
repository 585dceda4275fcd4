"""Text cleaning: pre_caption and pre_question on hand-made strings."""

from dataset.text import pre_caption, pre_question


def test_pre_caption_deletes_every_punctuation_character():
    assert pre_caption("A, b. c' d! e? f\" g( h) i* j# k: l; m~") == "a b c d e f g h i j k l m"


def test_pre_caption_deletes_rather_than_spaces_punctuation():
    assert pre_caption("don't stop...now") == "dont stopnow"


def test_pre_caption_keeps_characters_outside_the_set():
    assert pre_caption("cost $5 & 50% [ok] {x} @y") == "cost $5 & 50% [ok] {x} @y"


def test_pre_caption_person_token_and_separators():
    assert pre_caption("<person> rides a well-known bike/scooter") == "person rides a well known bike scooter"


def test_pre_caption_lowercases():
    assert pre_caption("A Big DOG") == "a big dog"


def test_pre_caption_collapses_whitespace_runs_and_strips():
    assert pre_caption("  a  dog\t\tand \n a cat \n") == "a dog and a cat"


def test_pre_caption_single_tab_survives():
    # Only runs of two or more whitespace characters collapse, as in the official regex.
    assert pre_caption("a\tdog") == "a\tdog"


def test_pre_caption_dash_next_to_space_collapses():
    assert pre_caption("a - b") == "a b"


def test_pre_caption_word_limit():
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption(" ".join(words), max_words=5) == "w0 w1 w2 w3 w4"
    assert pre_caption("one two", max_words=5) == "one two"


def test_pre_question_basic_cleaning():
    assert pre_question("What colour is the man's T-shirt?") == "what colour is the mans t shirt"


def test_pre_question_does_not_collapse_or_strip_leading_space():
    assert pre_question("  How   many/which? ") == "  how   many which"


def test_pre_question_has_no_person_rule():
    assert pre_question("Is <person> here?") == "is <person> here"


def test_pre_question_strips_trailing_spaces_only():
    assert pre_question("is it\n") == "is it\n"
    assert pre_question("is it   ") == "is it"


def test_pre_question_word_limit_counts_empty_strings():
    assert pre_question("a  b c", max_words=2) == "a "
    words = [f"q{i}" for i in range(60)]
    assert pre_question(" ".join(words)) == " ".join(words[:50])
    assert pre_question(" ".join(words), max_words=30) == " ".join(words[:30])
