"""Which matchers' whole-word terms could match a text, found by looking up the text's words in a dictionary of
the terms' first words, so that the long alternation of every term is searched only where it may match.

Why this never hides a match (see `_Matcher` in processors/moderation.py): a whole-word term is the regex
`(?<![a-z0-9])(?:term|term|...)(?![a-z0-9])`, each term its words joined by separators that may be absent, a
word its letters as written (a trailing `*` adds `[a-z]*`). A match therefore starts with the first word's
letters, before any `*`, at a place that [a-z0-9] does not precede: where a run of [a-z0-9] begins, and that run
begins with those letters. A matcher none of whose first words begins a run of the text cannot match it. Terms
are made of [a-z0-9*] only; one whose first word starts with `*` (a literal star there) starts no run, so its
matcher is always searched.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)

_WORD = re.compile(r"[a-z0-9]+")
# First words are filed under their first three letters, and a word of the text is looked up by its own first
# three; each first word found is then compared in full. The rare first words shorter than that are filed apart
# under all their letters, and looked up by a word's first one and two.
_PREFIX_LENGTH = 3


def words_of(texts: Iterable[str]) -> frozenset[str]:
    """The runs of [a-z0-9] in the texts: the only places a whole-word match can start."""
    return frozenset(_WORD.findall(" ".join(texts)))  # a run never spans the space between two texts


class FirstWords(Generic[Key]):
    """An index from the first words of each matcher's terms (the letters before any `*`) to the matcher."""

    def __init__(self, first_words: Iterable[tuple[Key, Iterable[str]]]) -> None:
        self._by_prefix: dict[str, list[tuple[str, Key]]] = {}
        self._short: dict[str, list[tuple[str, Key]]] = {}
        self._always: set[Key] = set()
        for key, words in first_words:
            for word in words:
                letters = _WORD.match(word)  # the letters a run of the text must begin with
                if letters is None:
                    self._always.add(key)
                    continue
                head = letters.group()
                index = self._by_prefix if len(head) >= _PREFIX_LENGTH else self._short
                index.setdefault(head[:_PREFIX_LENGTH], []).append((head, key))

    def could_match(self, words: Iterable[str]) -> set[Key]:
        """The matchers that may match a text with these runs of [a-z0-9] (see `words_of`); the others cannot."""
        found = set(self._always)
        for word in words:
            for head, key in self._by_prefix.get(word[:_PREFIX_LENGTH], ()):
                if word.startswith(head):
                    found.add(key)
            if self._short:
                for length in range(1, _PREFIX_LENGTH):
                    for head, key in self._short.get(word[:length], ()):
                        if word.startswith(head):
                            found.add(key)
        return found
