"""Count the words of a document: the function behind the README's first command.

    procpool run examples/wordcount/wordcount.py:count_words examples/wordcount/input.jsonl -o out.jsonl

Each record of ``input.jsonl`` is ``{"id": ..., "text": ...}`` (a docstring of
the Python standard library, so a few thousand real English documents). The
result per record is its word count, distinct words, and most common words,
leaving out the commonest English ones.
"""

from __future__ import annotations

import re
from collections import Counter

WORD = re.compile(r"[a-z][a-z'-]*[a-z]|[a-z]")

STOPWORDS = frozenset(
    """a an and are as at be by for from has have if in into is it its may not of on or
    that the this to was were will with which when can should must than then there these
    they their does do be been but also only such no so any all one two none true false
    return returns object objects value values default""".split()
)


def count_words(record: dict) -> dict:
    """Return the word statistics of ``record["text"]``.

    Raises:
        KeyError: if the record has no ``"text"``.
        TypeError: if ``text`` is not a string.
    """
    text = record["text"]
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    words = WORD.findall(text.lower())
    counts = Counter(w for w in words if w not in STOPWORDS)
    return {
        "id": record.get("id"),
        "words": len(words),
        "distinct": len(set(words)),
        "top": counts.most_common(5),
    }
