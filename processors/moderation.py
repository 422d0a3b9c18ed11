"""Prompt moderation by rules: normalization that undoes trivial evasion, categories of terms and patterns in
English and Chinese, and a per-tenant policy that maps each category to allow, review or block.

Normalization: NFKC (full-width and compatibility forms), accents and other combining marks dropped, zero-width
and other format or control characters removed, case folded, Cyrillic and Greek look-alikes read as Latin, and a
second reading with digits and symbols read as letters ("p0rn", "$ex"). Latin terms match whole words (so
"therapist" never matches "rapist"), with any separators, or none, between the words of a term; letters spaced
out one separator apart ("p o r n", "p.o.r.n") are read as one word. CJK terms match as substrings of the text
with every separator removed.

Only the positive prompt is moderated: a negative prompt lists what the image should avoid, so its words
("gore, blood, nudity") are not a request for them. What a negative prompt may still steer is for an image
safety check after rendering, which the pipeline does not run yet.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from processors.moderation_policy import (
    Category,
    ClassifierThresholds,
    ModerationPolicy,
    PolicyError,
    TenantPolicy,
    default_categories,
)
from processors.moderation_prefilter import FirstWords, words_of
from schemas.moderation import (
    Action,
    ImageModerator,
    ImageVerdict,
    TextModerator,
    Verdict,
    combine,
    strictness,
)

__all__ = [
    "Action", "Category", "ClassifierThresholds", "ImageModerator", "ImageVerdict", "ModerationPolicy",
    "ModeratorChain", "PolicyError", "RuleModerator", "TenantPolicy", "TextModerator", "Verdict", "combine",
    "load_policy", "normalize", "text_to_moderate",
]

TENANT_BLOCKED = "tenant_blocked"
TENANT_REVIEW = "tenant_review"


def text_to_moderate(prompt: str, negative_prompt: str | None = None) -> str:
    """The text the gate moderates for a request: the prompt alone (see the module's doc for why the negative
    prompt is left out)."""
    del negative_prompt
    return prompt


# ---------------------------------------------------------------------------------------------- normalization

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_WHITESPACE_CONTROLS = frozenset("\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")
# Cyrillic and Greek letters that look like Latin ones, written as escapes so that the source shows which is which.
_LOOKALIKES = str.maketrans(
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443\u0445\u0456\u0458\u0455"
    "\u0501\u0261\u03b1\u03b2\u03b5\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7",
    "abeekmhopctyxijsdgabeikvoptux",
)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
# A whole run of [a-z0-9@$!] with a digit or symbol that may stand for a letter. Only runs with a letter are read
# as letters (a bare number stays one); runs with neither are left alone without a call per word. The
# look-behind keeps the search from trying again inside a run that has no such digit or symbol.
_LEET_RUN = re.compile(r"(?<![a-z0-9@$!])[a-z0-9@$!]*[013457@$!][a-z0-9@$!]*")
_LETTER = re.compile(r"[a-z]")
_LEET_CHAR = re.compile(r"[013457@$!]")  # without one of these, the leet reading is the text as written
# Three or more letters each followed by one separator: "p o r n", "p.o.r.n", "p-o-r-n".
_SPACED_LETTERS = re.compile(r"(?<![a-z0-9])(?:[a-z0-9@$!][ .\-_*·|/\\,+~:;'\"]){2,}[a-z0-9@$!](?![a-z0-9])")
_SEPARATOR_RUN = re.compile(r"[\W_]+")
_BETWEEN_WORDS = r"[\W_]*"
# In ASCII the normal forms change nothing and the only characters dropped are the controls (Cc), of which the
# whitespace ones become spaces: one table does what the loop below does.
_ASCII_CONTROLS = {code: (" " if chr(code) in _WHITESPACE_CONTROLS else None) for code in (*range(0x20), 0x7f)}


def normalize(text: str) -> str:
    """Compatibility forms folded (NFKC), combining marks, format and control characters removed (whitespace
    controls become spaces), case folded, runs of whitespace made one space."""
    if text.isascii():
        return " ".join(text.translate(_ASCII_CONTROLS).casefold().split())
    return normalize_unicode(text)


def normalize_unicode(text: str) -> str:
    """`normalize` character by character through the Unicode tables: what the ASCII path above must equal."""
    kept: list[str] = []
    for char in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text)):
        if char in _WHITESPACE_CONTROLS:
            kept.append(" ")
        elif unicodedata.category(char) not in ("Mn", "Me", "Cf", "Cc", "Co", "Cs"):
            kept.append(char)
    return " ".join(unicodedata.normalize("NFC", "".join(kept)).casefold().split())


@dataclass(frozen=True)
class _Readings:
    latin: tuple[str, ...]  # the text as written, and with digits and symbols read as letters
    spaced_runs: tuple[str, ...]  # letters spaced one separator apart, joined
    words: frozenset[str]  # the runs of [a-z0-9] in `latin`, where a whole-word match can start
    normalized: str  # before look-alikes are read as Latin

    @classmethod
    def of(cls, text: str) -> _Readings:
        base = normalize(text)
        latin = base if base.isascii() else base.translate(_LOOKALIKES)  # the look-alikes are not ASCII
        leet = _LEET_RUN.sub(_read_leet, latin) if _LEET_CHAR.search(latin) else latin
        spaced = [_SEPARATOR_RUN.sub("", m.group()) for m in _SPACED_LETTERS.finditer(latin)]
        runs = {*spaced, *(run.translate(_LEET) for run in spaced)}
        readings = (latin,) if leet == latin else (latin, leet)
        return cls(readings, tuple(sorted(runs)), words_of(readings), base)

    # The two below are worked out only when asked: most texts have no CJK, and then no default term needs them.
    @cached_property
    def compact_has_cjk(self) -> bool:
        """If not, only CJK terms that normalize to no CJK character can match."""
        return not self.normalized.isascii() and bool(_CJK.search(self.compact))

    @cached_property
    def compact(self) -> str:
        """Every separator removed, for CJK terms."""
        return _SEPARATOR_RUN.sub("", self.normalized)


def _read_leet(run: re.Match[str]) -> str:
    return run.group().translate(_LEET) if _LETTER.search(run.group()) else run.group()


# ---------------------------------------------------------------------------------------------------- matching

def _is_cjk(term: str) -> bool:
    return bool(_CJK.search(term))


def _latin_words(term: str) -> list[str]:
    words = [w for w in re.split(r"[^a-z0-9*]+", normalize(term).translate(_LOOKALIKES)) if w.strip("*")]
    if not words:
        raise PolicyError(f"term {term!r} has no letters to match")
    return words


def _word_regex(word: str) -> str:
    return re.escape(word.rstrip("*")) + ("[a-z]*" if word.endswith("*") else "")


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a matcher is a key of `FirstWords`
class _Matcher:
    """The compiled terms and patterns of one category."""

    category: str
    whole_words: re.Pattern[str] | None
    first_words: tuple[str, ...]  # each whole-word term's first word, for `FirstWords`
    inside_runs: re.Pattern[str] | None
    cjk_terms: tuple[tuple[str, str], ...]  # (compacted, as written)
    # Those of `cjk_terms` whose compacted form has no CJK character (NFKC may fold one away): the only ones
    # that can be found in a text without one.
    cjk_terms_without_cjk: tuple[tuple[str, str], ...]
    patterns: tuple[tuple[re.Pattern[str], str], ...]
    term_of: Mapping[str, str]  # regex group name -> term as written

    @classmethod
    def build(cls, category: str, terms: Sequence[str], patterns: Sequence[str]) -> _Matcher:
        whole, first, loose, cjk, names = [], [], [], [], {}
        for index, term in enumerate(terms):
            if _is_cjk(term):
                cjk.append((_SEPARATOR_RUN.sub("", normalize(term)), term))
                continue
            latin_words = _latin_words(term)
            first.append(latin_words[0])
            words = [_word_regex(w) for w in latin_words]
            names[f"t{index}"] = term
            whole.append(f"(?P<t{index}>{_BETWEEN_WORDS.join(words)})")
            loose.append(f"(?P<t{index}>{''.join(words)})")
        compiled = []
        for index, pattern in enumerate(patterns):
            try:
                compiled.append((re.compile(pattern), f"pattern{index}"))
            except re.error as error:
                raise PolicyError(f"category {category!r}: pattern {pattern!r} is not a valid expression: "
                                  f"{error}") from error
        # The word boundaries stand outside the alternation, so that the search gives up at once inside a word.
        # moderation_prefilter relies on this shape: change one, change the other.
        return cls(category, re.compile(f"(?<![a-z0-9])(?:{'|'.join(whole)})(?![a-z0-9])") if whole else None,
                   tuple(first), re.compile("|".join(loose)) if loose else None, tuple(cjk),
                   tuple((compacted, term) for compacted, term in cjk if not _CJK.search(compacted)),
                   tuple(compiled), names)

    def first_match(self, readings: _Readings, words_may_match: bool = True) -> str | None:
        """The term or pattern that matches, or None. `words_may_match` False (from `FirstWords`) skips the
        whole-word search, which cannot then match."""
        for text in readings.latin if words_may_match else ():
            if self.whole_words and (found := self.whole_words.search(text)):
                return self.term_of[str(found.lastgroup)]
        for run in readings.spaced_runs:
            if self.inside_runs and (found := self.inside_runs.search(run)):
                return self.term_of[str(found.lastgroup)]
        for compacted, term in self.cjk_terms if readings.compact_has_cjk else self.cjk_terms_without_cjk:
            if compacted and compacted in readings.compact:
                return term
        for pattern, name in self.patterns:
            for text in readings.latin:
                if pattern.search(text):
                    return name
        return None


# ------------------------------------------------------------------------------------------------ policy file

def load_policy(path: str | Path) -> ModerationPolicy:
    """A policy from a JSON file: the default categories, changed and extended by the file.

    {"categories": {"violence": {"action": "review", "terms": ["more", "terms"], "patterns": ["regex"]},
                    "brand": {"severity": "medium", "action": "review", "terms": ["rival brand"]}},
     "classifier": {"review_at": 0.9, "block_at": null},
     "tenants": {"acme": {"actions": {"election_manipulation": "allow"}, "blocked_terms": ["..."],
                          "review_terms": ["..."], "classifier": {"review_at": 0.8, "block_at": 0.99}}}}

    Terms and patterns in the file add to a default category's; a new category needs a severity and an action.
    Raises PolicyError naming the file and what is wrong."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolicyError(f"moderation policy {path}: cannot be read as JSON: {error}") from error
    try:
        return policy_from_mapping(document)
    except PolicyError as error:
        raise PolicyError(f"moderation policy {path}: {error}") from error


def policy_from_mapping(document: object) -> ModerationPolicy:
    root = _mapping(document, "the document", {"categories", "classifier", "tenants"})
    categories = {c.name: c for c in default_categories()}
    for name, spec in _mapping(root.get("categories", {}), "categories").items():
        where = f"categories.{name}"
        spec = _mapping(spec, where, {"severity", "action", "terms", "patterns", "locked"})
        terms, patterns = _strings(spec.get("terms", []), f"{where}.terms"), \
            _strings(spec.get("patterns", []), f"{where}.patterns")
        if name in categories:
            known = categories[name]
            categories[name] = replace(known, severity=spec.get("severity", known.severity),
                                       action=spec.get("action", known.action), terms=known.terms + terms,
                                       patterns=known.patterns + patterns,
                                       locked=known.locked or bool(spec.get("locked", False)))
        elif "severity" not in spec or "action" not in spec:
            raise PolicyError(f"{where}: a new category needs a severity and an action")
        else:
            categories[name] = Category(name, spec["severity"], spec["action"], terms, patterns,
                                        bool(spec.get("locked", False)))
    tenants = {}
    for tenant, spec in _mapping(root.get("tenants", {}), "tenants").items():
        where = f"tenants.{tenant}"
        spec = _mapping(spec, where, {"actions", "blocked_terms", "review_terms", "classifier"})
        tenants[tenant] = TenantPolicy(
            actions=dict(_mapping(spec.get("actions", {}), f"{where}.actions")),
            blocked_terms=_strings(spec.get("blocked_terms", []), f"{where}.blocked_terms"),
            review_terms=_strings(spec.get("review_terms", []), f"{where}.review_terms"),
            classifier=_thresholds(spec["classifier"], f"{where}.classifier") if "classifier" in spec else None)
    classifier = _thresholds(root["classifier"], "classifier") if "classifier" in root else ClassifierThresholds()
    policy = ModerationPolicy(tuple(categories.values()), classifier, tenants)
    RuleModerator(policy)  # compiles every term and pattern now, so that a bad one fails the load
    return policy


def _mapping(value: object, where: str, allowed: set[str] | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a JSON object")
    unknown = set(value) - allowed if allowed is not None else set()
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(allowed or ())}")
    return value


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PolicyError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _thresholds(value: object, where: str) -> ClassifierThresholds:
    spec = _mapping(value, where, {"review_at", "block_at"})
    default = ClassifierThresholds()
    for key, number in spec.items():
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
            raise PolicyError(f"{where}.{key} must be a number or null")
    try:
        return ClassifierThresholds(float(spec.get("review_at", default.review_at)),
                                    spec.get("block_at", default.block_at))
    except PolicyError as error:
        raise PolicyError(f"{where}: {error}") from error


# --------------------------------------------------------------------------------------------------- moderators

class RuleModerator:
    """TextModerator by the policy's categories and the tenant's own terms. Pure: no I/O."""

    provider = "rules"

    def __init__(self, policy: ModerationPolicy | None = None) -> None:
        self.policy = policy or ModerationPolicy()
        self._matchers = tuple(_Matcher.build(c.name, c.terms, c.patterns) for c in self.policy.categories)
        self._tenant_matchers = {tenant: self._build_tenant(p) for tenant, p in self.policy.tenants.items()}
        # What each tenant searches, in order, is fixed by the policy: worked out here once for each tenant it
        # names, and once for all others. Nothing is added per call, so tenant names from outside cannot grow it.
        self._default_order = self._strictest_first(None, ())
        self._orders = {tenant: self._strictest_first(tenant, self._tenant_matchers[tenant])
                        for tenant in self.policy.tenants}
        self._first_words = FirstWords((m, m.first_words) for m in self._matchers)
        self._tenant_first_words = {tenant: FirstWords((m, m.first_words) for m, _ in matchers)
                                    for tenant, matchers in self._tenant_matchers.items() if matchers}

    @staticmethod
    def _build_tenant(policy: TenantPolicy) -> tuple[tuple[_Matcher, Action], ...]:
        matchers: list[tuple[_Matcher, Action]] = []
        if policy.blocked_terms:
            matchers.append((_Matcher.build(TENANT_BLOCKED, policy.blocked_terms, ()), "block"))
        if policy.review_terms:
            matchers.append((_Matcher.build(TENANT_REVIEW, policy.review_terms, ()), "review"))
        return tuple(matchers)

    def _strictest_first(self, tenant: str | None, own: Iterable[tuple[_Matcher, Action]]
                         ) -> tuple[tuple[_Matcher, Action], ...]:
        """The matchers a tenant (None: any the policy does not name) searches with the action each takes,
        strictest first: the first match is then the verdict. Allowed categories are left out, as they are never
        searched."""
        candidates = [(m, self.policy.action_for(m.category, tenant)) for m in self._matchers]
        candidates += own
        candidates.sort(key=lambda pair: -strictness(pair[1]))  # stable: equally strict ones keep their order
        return tuple(pair for pair in candidates if pair[1] != "allow")

    def check(self, text: str, tenant: str) -> Verdict:
        readings = _Readings.of(text)
        may_match = self._first_words.could_match(readings.words)
        if tenant_words := self._tenant_first_words.get(tenant):
            may_match |= tenant_words.could_match(readings.words)
        for matcher, action in self._orders.get(tenant, self._default_order):
            hit = matcher.first_match(readings, matcher in may_match)
            if hit is not None:
                return Verdict(action, f"{matcher.category}:{hit}", matcher.category, None, self.provider)
        return Verdict("allow", None, None, None, self.provider)


class ModeratorChain:
    """Asks each moderator in turn and keeps the strictest verdict. With `stop_at_block` (the default) it stops
    at the first block, so that slower or paid moderators placed later are not asked about a prompt the rules
    already refuse."""

    def __init__(self, moderators: Sequence[TextModerator], stop_at_block: bool = True) -> None:
        self.moderators = tuple(moderators)
        self.stop_at_block = stop_at_block

    def check(self, text: str, tenant: str) -> Verdict:
        verdicts = []
        for moderator in self.moderators:
            verdict = moderator.check(text, tenant)
            verdicts.append(verdict)
            if self.stop_at_block and verdict.action == "block":
                break
        return combine(verdicts)
