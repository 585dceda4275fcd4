"""Text cleaning applied to every caption, sentence, referring expression and question."""

import re

# Deleted outright (not replaced by a space), as in the official cleaning.
_DELETED_PUNCTUATION = ",.'!?\"()*#:;~"
_DELETE_TABLE = str.maketrans("", "", _DELETED_PUNCTUATION)
_SPLIT_TABLE = str.maketrans({"-": " ", "/": " "})
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _strip_punctuation(text: str) -> str:
    """Lowercase, delete the punctuation set and turn '-' and '/' into spaces."""
    return text.lower().translate(_DELETE_TABLE).translate(_SPLIT_TABLE)


def _keep_first_words(text: str, max_words: int) -> str:
    """Keep the first `max_words` words, splitting on single spaces (empty strings count as words)."""
    words = text.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption, sentence or referring expression exactly as the official `pre_caption`."""
    text = _strip_punctuation(caption).replace("<person>", "person")
    # Only runs of two or more whitespace characters collapse; a lone tab or newline survives (official).
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return _keep_first_words(text, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question as the official `pre_question`: no whitespace collapsing, trailing spaces stripped."""
    text = _strip_punctuation(question).rstrip(" ")
    return _keep_first_words(text, max_words)
