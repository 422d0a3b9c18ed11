"""The fast path of the rule moderator gives the verdict the full search gives, for every text and tenant.

The reference below is the algorithm as it was before the fast path (Unicode normalization for every text, the
candidates sorted on every call, every category's full regexes searched): over a large generated corpus of
terms, evasions and random text, the moderator must agree with it on every verdict, action, rule and category.
The reference shares the moderator's tables (look-alikes, leet, CJK range), so that a change to a table the fast
path relies on (say, an ASCII look-alike) shows up here as a disagreement.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import pytest

from processors.moderation import (
    _CJK,
    _LEET,
    _LEET_CHAR,
    _LOOKALIKES,
    _SEPARATOR_RUN,
    _SPACED_LETTERS,
    TENANT_BLOCKED,
    TENANT_REVIEW,
    Category,
    ModerationPolicy,
    RuleModerator,
    TenantPolicy,
    Verdict,
    _latin_words,
    _Readings,
    _word_regex,
    normalize,
    normalize_unicode,
)
from processors.moderation_prefilter import words_of
from processors.moderation_rules import DEFAULT_CATEGORIES
from schemas.moderation import Action, strictness

# --------------------------------------------------------------------------- the reference: the full search

_REFERENCE_LEET_TOKEN = re.compile(r"[a-z0-9@$!]*[a-z][a-z0-9@$!]*")
_REFERENCE_BETWEEN_WORDS = r"[\W_]*"


# The character-by-character path, which the previous algorithm ran on every text; the ASCII shortcut is checked
# against it below.
reference_normalize = normalize_unicode


@dataclass(frozen=True)
class ReferenceReadings:
    latin: tuple[str, ...]
    spaced_runs: tuple[str, ...]
    compact: str

    @classmethod
    def of(cls, text: str) -> ReferenceReadings:
        base = reference_normalize(text)
        latin = base.translate(_LOOKALIKES)
        leet = _REFERENCE_LEET_TOKEN.sub(lambda m: m.group().translate(_LEET), latin)
        runs = {_SEPARATOR_RUN.sub("", m.group()) for m in _SPACED_LETTERS.finditer(latin)}
        runs |= {_SEPARATOR_RUN.sub("", m.group()).translate(_LEET) for m in _SPACED_LETTERS.finditer(latin)}
        readings = (latin,) if leet == latin else (latin, leet)
        return cls(readings, tuple(sorted(runs)), _SEPARATOR_RUN.sub("", base))


@dataclass(frozen=True)
class ReferenceMatcher:
    category: str
    whole_words: re.Pattern[str] | None
    inside_runs: re.Pattern[str] | None
    cjk_terms: tuple[tuple[str, str], ...]
    patterns: tuple[tuple[re.Pattern[str], str], ...]
    term_of: Mapping[str, str]

    @classmethod
    def build(cls, category: str, terms: Sequence[str], patterns: Sequence[str]) -> ReferenceMatcher:
        whole, loose, cjk, names = [], [], [], {}
        for index, term in enumerate(terms):
            if _CJK.search(term):
                cjk.append((_SEPARATOR_RUN.sub("", reference_normalize(term)), term))
                continue
            words = [_word_regex(w) for w in _latin_words(term)]
            names[f"t{index}"] = term
            whole.append(f"(?P<t{index}>{_REFERENCE_BETWEEN_WORDS.join(words)})")
            loose.append(f"(?P<t{index}>{''.join(words)})")
        compiled = [(re.compile(pattern), f"pattern{index}") for index, pattern in enumerate(patterns)]
        return cls(category, re.compile(f"(?<![a-z0-9])(?:{'|'.join(whole)})(?![a-z0-9])") if whole else None,
                   re.compile("|".join(loose)) if loose else None, tuple(cjk), tuple(compiled), names)

    def first_match(self, readings: ReferenceReadings) -> str | None:
        for text in readings.latin:
            if self.whole_words and (found := self.whole_words.search(text)):
                return self.term_of[str(found.lastgroup)]
        for run in readings.spaced_runs:
            if self.inside_runs and (found := self.inside_runs.search(run)):
                return self.term_of[str(found.lastgroup)]
        for compacted, term in self.cjk_terms:
            if compacted and compacted in readings.compact:
                return term
        for pattern, name in self.patterns:
            if any(pattern.search(text) for text in readings.latin):
                return name
        return None


class ReferenceModerator:
    def __init__(self, policy: ModerationPolicy) -> None:
        self.policy = policy
        self.matchers = [ReferenceMatcher.build(c.name, c.terms, c.patterns) for c in policy.categories]
        self.tenant_matchers: dict[str, list[tuple[ReferenceMatcher, Action]]] = {}
        for tenant, spec in policy.tenants.items():
            own: list[tuple[ReferenceMatcher, Action]] = []
            if spec.blocked_terms:
                own.append((ReferenceMatcher.build(TENANT_BLOCKED, spec.blocked_terms, ()), "block"))
            if spec.review_terms:
                own.append((ReferenceMatcher.build(TENANT_REVIEW, spec.review_terms, ()), "review"))
            self.tenant_matchers[tenant] = own

    def check(self, text: str, tenant: str) -> Verdict:
        return self.verdict(ReferenceReadings.of(text), tenant)

    def verdict(self, readings: ReferenceReadings, tenant: str) -> Verdict:
        candidates: list[tuple[ReferenceMatcher, Action]] = [
            (m, self.policy.action_for(m.category, tenant)) for m in self.matchers]
        candidates += self.tenant_matchers.get(tenant, ())
        candidates.sort(key=lambda pair: -strictness(pair[1]))
        for matcher, action in candidates:
            if action == "allow":
                break
            hit = matcher.first_match(readings)
            if hit is not None:
                return Verdict(action, f"{matcher.category}:{hit}", matcher.category, None, "rules")
        return Verdict("allow", None, None, None, "rules")


# ------------------------------------------------------------------------------------------------ the corpus

NEUTRAL = ("a photo of {} on a white table", "{}", "{} poster, 4k", "studio shot: {}!", "一张{}的照片",
           "logo ({}) 85mm", "{}\n\nsoft light")
LEET_FOR = {"o": "0", "i": "1", "e": "3", "a": "4", "s": "5", "t": "7"}
CYRILLIC_FOR = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445",
                "y": "\u0443", "k": "\u043a", "i": "\u0456"}
CONTROLS = ("\x00", "\x07", "\t", "\x7f", "\x1c", "\u200b", "\ufeff", "\x85")
SEPARATORS = (" ", ".", "_", "·", "|", "  ", ". ")
PATTERN_EXAMPLES = ("child nude photo", "kids in a naked scene", "nude photos of toddlers", "a preteen sexy pose",
                    "erotic art with minors", "porn with underage kids", "sexy photo", "s.e.x video",
                    "s-e-x-y pics", "sex images", "cutting off his head", "chopped off the legs",
                    "cut off arm", "schoolgirl in a very sexy outfit", "nsfw of the children",
                    "s e x photo", "sexy\tpicture", "the kid is naked")
UNICODE_POOL = ("aeiouxyzprnsk0134578@$! .-_,\t\n\x00\x7f\x1c\u0301\u0308\u20dd\u200b\u200d\u2060\ufeff"
                "\u00ad\u00e9\u00f1\u00df\u0130\u0131\u017f\ufb01\u2126\u212a\u0430\u0435\u043e\u0440\u0441"
                "\u03b1\u03bf\u03c1\uff50\uff4f\uff52\uff4e\uff10\uff01\u3000\u30fb\u30a0\u3042\u30a2\uac00"
                "\u1100\u1161\uf900\uf9f0\u2f00\u3250\u32a4\u8272\u60c5\u8840\u8165\u81ea\u6740\u9009\u4e3e"
                "\ue000\ud800\u0085\u00a0\u2028\u00b7\u2024\u2215\uff0e")


# Tenant terms with the edge cases of the word index and the CJK shortcut: a star inside a word or before it,
# digits, first words of one and two letters, and CJK terms that normalize to no CJK character at all (the
# katakana middle dot is a separator, the combining voiced mark is dropped), which match Latin text.
TENANT_TERMS = ["rival brand", "竞品", "a*b", "*star", "4k", "q", "x\u30fby", "knockoff", "ab cd", "gore",
                "ab\u3099c", "色\u30fb情x"]


def default_terms() -> list[str]:
    return [term for spec in DEFAULT_CATEGORIES.values() for term in spec.get("terms", ())]


def variants(term: str) -> Iterator[str]:
    """The term as written and in the evasions the rules undo, or nearly undo."""
    yield term
    yield term.upper()
    yield term.title()
    yield term.replace(" ", "")                       # glued: "handbag" for "hand bag"
    yield term.replace(" ", "-")
    yield term.replace("*", "")
    yield term.replace("*", "ing")                    # a word the starred term begins
    yield term.replace("*", "") + "x1"
    yield "x" + term                                  # inside a longer word
    yield "the" + term.replace(" ", "")
    yield term.replace("*", "") + "s"
    yield term.replace("*", "") + "9"
    yield "9" + term
    for separator in SEPARATORS:
        yield separator.join(term.replace("*", ""))     # spaced out: "p o r n", "p.o.r.n"
    yield "".join(LEET_FOR.get(c, c) for c in term)
    yield "".join(LEET_FOR.get(c, c) for c in term[: len(term) // 2]) + term[len(term) // 2:]
    yield " ".join(LEET_FOR.get(c, c) for c in term.replace("*", ""))
    yield "".join(CYRILLIC_FOR.get(c, c) for c in term)
    yield "".join(c + "\u0301" if c in "aeiou" else c for c in term)
    yield "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c) for c in term)
    for control in CONTROLS:
        yield control.join(term)
        if " " in term:
            yield term.replace(" ", control)


def corpus() -> list[str]:
    texts: list[str] = []
    for term in default_terms() + list(PATTERN_EXAMPLES) + TENANT_TERMS + ["zombie", "casino", "赌场", "xy"]:
        for index, variant in enumerate(variants(term)):
            texts.append(NEUTRAL[index % len(NEUTRAL)].format(variant))
        if _CJK.search(term):
            texts += [f"abc{term}def", f"{term} in latin text", " ".join(term), f"x{term[:1]}\u200b{term[1:]}"]
    rng = random.Random(20240607)
    pieces = default_terms() + list(PATTERN_EXAMPLES) + ["therapist", "essex", "85mm", "p@rn", "$ex", "g0re"]
    ascii_alphabet = [chr(code) for code in range(128)]
    for _ in range(1000):  # random ASCII, some of it built from the terms so that it sometimes matches
        parts = [rng.choice(pieces) if rng.random() < 0.3 else
                 "".join(rng.choice(ascii_alphabet) for _ in range(rng.randint(0, 8)))
                 for _ in range(rng.randint(1, 6))]
        texts.append(rng.choice(["", " ", "\t", "-", ".", "\x00"]).join(parts))
    for _ in range(1000):  # random Unicode, some of it around the terms
        parts = ["".join(rng.choice(UNICODE_POOL) for _ in range(rng.randint(0, 10))) for _ in range(3)]
        if rng.random() < 0.5:
            parts.insert(1, rng.choice(pieces))
        texts.append("".join(parts))
    for _ in range(300):  # random code points anywhere in the BMP and beyond
        texts.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randint(1, 12))))
    return list(dict.fromkeys(texts))


CORPUS = corpus()

ALLOW_ALL_BUT_THE_LOCKED: dict[str, Action] = {
    name: "allow" for name in [*DEFAULT_CATEGORIES, "gambling"] if name != "sexual_minors"}
TENANT_POLICY = ModerationPolicy(
    categories=(*ModerationPolicy().categories,
                Category("gambling", "medium", "review", ("casino", "赌场", "bet*", "x"), (r"\bodds\b",))),
    tenants={
        "acme": TenantPolicy(actions={"violence": "review", "election_manipulation": "allow"},
                             blocked_terms=tuple(TENANT_TERMS[:7]), review_terms=tuple(TENANT_TERMS[7:])),
        "news": TenantPolicy(actions={"sexual": "review", "suggestive": "allow", "violence_mild": "allow",
                                      "gambling": "block"}),
        "kids": TenantPolicy(actions={"suggestive": "block", "gambling": "block"}, blocked_terms=("zombie*",)),
        "lax": TenantPolicy(actions=ALLOW_ALL_BUT_THE_LOCKED, review_terms=("casino",)),
    })


# --------------------------------------------------------------------------------------------------- the tests

def test_the_corpus_holds_matches_of_every_kind_and_plain_text() -> None:
    reference = ReferenceModerator(TENANT_POLICY)
    verdicts = [reference.check(text, "acme") for text in CORPUS]
    categories = {v.category for v in verdicts}
    assert set(DEFAULT_CATEGORIES) - {"election_manipulation"} <= categories  # acme allows that one
    assert {TENANT_BLOCKED, TENANT_REVIEW, "gambling"} <= categories
    rules = {v.rule for v in verdicts}
    assert {f"{TENANT_BLOCKED}:x\u30fby", f"{TENANT_REVIEW}:ab\u3099c", f"{TENANT_BLOCKED}:*star"} <= rules
    assert sum(v.action == "allow" for v in verdicts) > len(CORPUS) // 5
    assert sum(v.action == "block" for v in verdicts) > len(CORPUS) // 5
    assert any(v.rule and ":pattern" in v.rule for v in verdicts)


@pytest.mark.parametrize("policy", [ModerationPolicy(), TENANT_POLICY], ids=["default", "tenants"])
def test_every_verdict_is_the_one_the_full_search_gives(policy: ModerationPolicy) -> None:
    moderator, reference = RuleModerator(policy), ReferenceModerator(policy)
    tenants = [*policy.tenants, "someone else"]
    disagreements = []
    for text in CORPUS:
        readings = ReferenceReadings.of(text)
        for tenant in tenants:
            if (got := moderator.check(text, tenant)) != (expected := reference.verdict(readings, tenant)):
                disagreements.append((text, tenant, got, expected))
    assert disagreements == []


def test_the_readings_are_the_ones_the_full_normalization_gives() -> None:
    for text in CORPUS:
        readings, expected = _Readings.of(text), ReferenceReadings.of(text)
        assert (readings.latin, readings.spaced_runs, readings.compact) == \
            (expected.latin, expected.spaced_runs, expected.compact), text
        assert readings.compact_has_cjk == bool(_CJK.search(expected.compact)), text


def test_the_word_index_keeps_every_matcher_whose_words_match() -> None:
    moderator = RuleModerator(TENANT_POLICY)
    indexed = [(moderator._first_words, moderator._matchers)] + [
        (moderator._tenant_first_words[tenant], [m for m, _ in own])
        for tenant, own in moderator._tenant_matchers.items() if own]
    for text in CORPUS:
        readings = _Readings.of(text)
        for index, matchers in indexed:
            may_match = index.could_match(readings.words)
            for matcher in matchers:
                if matcher.whole_words and any(matcher.whole_words.search(t) for t in readings.latin):
                    assert matcher in may_match, (text, matcher.category)


def test_normalize_of_ascii_is_the_unicode_normalization() -> None:
    for code in range(128):
        for text in (chr(code), f"a{chr(code)}b", f" {chr(code)} ", chr(code) * 3):
            assert normalize(text) == reference_normalize(text), repr(text)
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(chr(rng.randrange(128)) for _ in range(rng.randint(0, 30)))
        assert normalize(text) == reference_normalize(text), repr(text)


def test_the_tables_the_fast_path_relies_on() -> None:
    assert all(code >= 128 for code in _LOOKALIKES)  # an ASCII text needs no look-alike table
    assert {chr(code) for code in _LEET} == set(_LEET_CHAR.pattern.strip("[]"))  # the digits and symbols read


def test_the_order_per_tenant_does_not_grow_with_the_tenants_asked_about() -> None:
    moderator = RuleModerator(TENANT_POLICY)
    reference = ReferenceModerator(TENANT_POLICY)
    for number in range(20_000):
        moderator.check("a gore casino", f"tenant-{number}")
    assert len(moderator._orders) == len(TENANT_POLICY.tenants)
    for tenant in [*TENANT_POLICY.tenants, "tenant-7"]:
        assert moderator.check("a gore casino", tenant) == reference.check("a gore casino", tenant)


def test_the_word_index_leaves_out_what_cannot_match() -> None:
    moderator = RuleModerator()  # not a timing test: only that the index lets most searches be skipped
    index = moderator._first_words
    assert index.could_match(words_of(["a red leather handbag on a white background, 85mm"])) == set()
    assert index.could_match(words_of(["therapist", "essex", "pornography"])) == {
        m for m in moderator._matchers if m.category == "sexual"}
