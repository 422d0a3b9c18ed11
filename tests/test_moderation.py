"""Prompt moderation by rules: each category in English and Chinese, evasions, false positives, tenant policy,
the policy file, and how verdicts combine."""
from __future__ import annotations

import json

import pytest

from processors.moderation import (
    ClassifierThresholds,
    ModerationPolicy,
    ModeratorChain,
    PolicyError,
    RuleModerator,
    TenantPolicy,
    Verdict,
    combine,
    load_policy,
    normalize,
    text_to_moderate,
)

RULES = RuleModerator()


def verdict(text: str, tenant: str = "acme") -> Verdict:
    return RULES.check(text, tenant)


@pytest.mark.parametrize(("prompt", "category"), [
    ("an nsfw photo of a model", "sexual"),
    ("porn star on a sofa", "sexual"),
    ("pornographic poster", "sexual"),
    ("a naked woman on a beach", "sexual"),
    ("gore, a severed hand", "violence"),
    ("a violent street fight", "violence"),
    ("a beheading scene", "violence"),
    ("self-harm scars on an arm", "self_harm"),
    ("a suicide note", "self_harm"),
    ("election manipulation leaflet", "election_manipulation"),
    ("ballot stuffing in action", "election_manipulation"),
    ("色情图片", "sexual"),
    ("一个裸体女人", "sexual"),
    ("裸體模特", "sexual"),
    ("暴力场面", "violence"),
    ("血腥的战场", "violence"),
    ("自残的手臂", "self_harm"),
    ("自杀现场", "self_harm"),
    ("自殺", "self_harm"),
    ("选举舞弊海报", "election_manipulation"),
    ("如何操纵选举", "election_manipulation"),
    ("選舉舞弊", "election_manipulation"),
    ("child nude photo", "sexual_minors"),
    ("儿童色情", "sexual_minors"),
])
def test_each_category_is_blocked_in_english_and_chinese(prompt: str, category: str) -> None:
    result = verdict(prompt)
    assert (result.action, result.category, result.provider) == ("block", category, "rules")
    assert result.rule is not None and result.rule.startswith(f"{category}:")


@pytest.mark.parametrize("prompt", [
    "PORN", "PoRn", "\uff50\uff4f\uff52\uff4e", "\uff30 \uff2f \uff32 \uff2e",  # case, full-width forms
    "p\u200bo\u200cr\u200dn", "p\ufeffor\u2060n", "p\x00orn",  # zero-width and control characters
    "p.o.r.n", "p o r n", "p-o-r-n", "p_o_r_n", "a p o r n image",  # letters spaced out
    "p0rn", "p0rn star", "g0re", "$uicide",                   # digits and symbols for letters
    "\u0440orn",                                                # a Cyrillic er for the p
    "pórn", "g\u0301ore",                                      # accents and combining marks
    "self harm", "selfharm", "self_harm", "SELF-HARM",          # separators between the words of a term
    "色\u200b情", "色 情", "色.情", "血　腥",                     # CJK with separators and an ideographic space
])
def test_trivial_evasions_are_caught(prompt: str) -> None:
    assert verdict(prompt).action == "block", prompt


@pytest.mark.parametrize("prompt", [
    "a red leather handbag on a white background",
    "nude heels on a marble floor",             # a colour, not nudity
    "a therapist's office with a green sofa",   # "rapist" inside a word
    "a grape vine at sunset",                    # "rape" inside a word
    "go re-do the render",                       # letters of "gore" across words
    "Bloody Mary cocktail mix bottle",
    "a sexy red dress on a mannequin",
    "4k product shot, 1080p, f/1.8",
    "Essex county map",                          # "sex" inside a word
    "paint stripper can", "baby bottle nipples",
    "黄色的连衣裙",                               # yellow dress
    "买票去看电影",                               # buying cinema tickets
])
def test_ordinary_product_prompts_are_allowed(prompt: str) -> None:
    assert verdict(prompt) == Verdict("allow", None, None, None, "rules")


def test_ambiguous_words_go_to_review_not_block() -> None:
    assert verdict("explicit lyrics sticker").action == "review"
    assert verdict("a murder mystery book cover").action == "review"
    assert verdict("naked eye view of the moon").category == "suggestive"


def test_whole_word_matching_keeps_therapist_apart_from_a_tenant_term() -> None:
    rules = RuleModerator(ModerationPolicy(tenants={"acme": TenantPolicy(blocked_terms=("rapist",))}))
    assert rules.check("a therapist's office", "acme").action == "allow"
    assert rules.check("a rapist", "acme").rule == "tenant_blocked:rapist"


def test_the_strictest_match_wins_over_the_first() -> None:
    result = verdict("explicit gore")  # suggestive (review) appears first, violence (block) is stricter
    assert (result.action, result.category) == ("block", "violence")


def test_normalize_folds_width_case_marks_and_invisible_characters() -> None:
    assert normalize("\uff23\uff41\uff46\u00e9\u200b\tBAR\n\n x") == "cafe bar x"


# --------------------------------------------------------------------------------------------- tenant policy

def test_a_tenant_can_turn_a_category_off_or_to_review_without_changing_others() -> None:
    policy = ModerationPolicy(tenants={
        "news": TenantPolicy(actions={"violence": "review", "election_manipulation": "allow"})})
    rules = RuleModerator(policy)
    assert rules.check("a violent riot", "news").action == "review"
    assert rules.check("election fraud headline", "news").action == "allow"
    assert rules.check("election fraud headline", "shop").action == "block"
    assert rules.check("porn", "news").action == "block"


def test_tenant_terms_block_or_review_only_for_that_tenant() -> None:
    policy = ModerationPolicy(tenants={"acme": TenantPolicy(blocked_terms=("rival brand", "竞品"),
                                                             review_terms=("knockoff",))})
    rules = RuleModerator(policy)
    assert rules.check("logo of RIVAL-brand", "acme").rule == "tenant_blocked:rival brand"
    assert rules.check("竞 品 包装", "acme").action == "block"
    assert rules.check("a knockoff watch", "acme").action == "review"
    assert rules.check("logo of rival brand", "other").action == "allow"


def test_a_locked_category_cannot_be_lowered() -> None:
    with pytest.raises(PolicyError, match="locked"):
        ModerationPolicy(tenants={"x": TenantPolicy(actions={"sexual_minors": "allow"})})


def test_unknown_category_and_action_are_refused() -> None:
    with pytest.raises(PolicyError, match="unknown category 'gambling'"):
        ModerationPolicy(tenants={"x": TenantPolicy(actions={"gambling": "review"})})
    with pytest.raises(PolicyError, match="action must be one of"):
        ModerationPolicy(tenants={"x": TenantPolicy(actions={"violence": "warn"})})  # type: ignore[dict-item]


def test_classifier_thresholds_map_scores_and_follow_the_tenant() -> None:
    policy = ModerationPolicy(classifier=ClassifierThresholds(0.5, 0.9),
                              tenants={"lax": TenantPolicy(classifier=ClassifierThresholds(0.95, None))})
    default = policy.classifier_for("anyone")
    assert [default.action_for(s) for s in (0.49, 0.5, 0.89, 0.9)] == ["allow", "review", "review", "block"]
    assert [policy.classifier_for("lax").action_for(s) for s in (0.94, 1.0)] == ["allow", "review"]
    with pytest.raises(PolicyError, match="below review_at"):
        ClassifierThresholds(0.9, 0.5)


# ------------------------------------------------------------------------------------------------ policy file

def write(tmp_path, document: object):
    path = tmp_path / "policy.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def test_load_policy_extends_defaults_and_reads_tenants(tmp_path) -> None:
    policy = load_policy(write(tmp_path, {
        "categories": {"violence": {"terms": ["bazooka"]},
                       "gambling": {"severity": "medium", "action": "review", "terms": ["casino", "赌场"]}},
        "classifier": {"review_at": 0.7, "block_at": None},
        "tenants": {"kids": {"actions": {"suggestive": "block"}, "blocked_terms": ["zombie"],
                             "classifier": {"review_at": 0.3}}},
    }))
    rules = RuleModerator(policy)
    assert rules.check("a bazooka", "any").category == "violence"
    assert rules.check("gore", "any").action == "block"  # default terms are kept
    assert rules.check("澳门赌场", "any").action == "review"
    assert rules.check("explicit", "kids").action == "block"
    assert rules.check("a zombie", "kids").action == "block"
    assert policy.classifier_for("any") == ClassifierThresholds(0.7, None)
    assert policy.classifier_for("kids").review_at == 0.3


@pytest.mark.parametrize(("document", "message"), [
    ("{not json", "cannot be read as JSON"),
    ([], "the document must be a JSON object"),
    ({"categorys": {}}, "unknown keys"),
    ({"categories": {"new": {"terms": ["x"]}}}, "needs a severity and an action"),
    ({"categories": {"violence": {"patterns": ["(unclosed"]}}}, "not a valid expression"),
    ({"categories": {"violence": {"terms": "gore"}}}, "list of non-empty strings"),
    ({"categories": {"violence": {"severity": "extreme"}}}, "severity must be one of"),
    ({"classifier": {"review_at": 1.5}}, r"within \[0, 1\]"),
    ({"classifier": {"review_at": "high"}}, "must be a number"),
    ({"tenants": {"a": {"actions": {"sexual_minors": "review"}}}}, "locked"),
    ({"tenants": {"a": {"blocked_terms": ["***"]}}}, "no letters"),
])
def test_load_policy_names_the_file_and_the_problem(tmp_path, document: object, message: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(PolicyError, match=message) as raised:
        load_policy(path)
    assert str(path) in str(raised.value)


def test_load_policy_of_a_missing_file_is_a_policy_error(tmp_path) -> None:
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------- combining and chaining

def v(action: str, provider: str) -> Verdict:
    return Verdict(action, None, None, None, provider)  # type: ignore[arg-type]


def test_combine_keeps_the_strictest_and_the_first_among_equals() -> None:
    assert combine([v("allow", "a"), v("review", "b"), v("block", "c"), v("block", "d")]).provider == "c"
    assert combine([v("review", "a"), v("allow", "b"), v("review", "c")]).provider == "a"
    assert combine([]).action == "allow"


class Recording:
    def __init__(self, action: str) -> None:
        self.action = action
        self.texts: list[str] = []

    def check(self, text: str, tenant: str) -> Verdict:
        self.texts.append(text)
        return v(self.action, "recording")


def test_a_chain_stops_at_the_first_block_so_later_moderators_are_not_asked() -> None:
    paid = Recording("allow")
    assert ModeratorChain([RULES, paid]).check("gore", "acme").provider == "rules"
    assert paid.texts == []
    assert ModeratorChain([RULES, paid], stop_at_block=False).check("gore", "acme").action == "block"
    assert paid.texts == ["gore"]


def test_a_chain_returns_a_later_moderators_review() -> None:
    assert ModeratorChain([RULES, Recording("review")]).check("a lamp", "acme").action == "review"


def test_only_the_positive_prompt_is_moderated() -> None:
    assert text_to_moderate("a clean kitchen", "gore, blood, nudity") == "a clean kitchen"


# ------------------------------------------------------------------------------------------------- classifier

class FakeModel:
    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return [self.scores[t] for t in texts]


def test_classifier_scores_map_by_the_tenants_thresholds_in_one_batch() -> None:
    from processors.text_classifier import ClassifierModerator

    model = FakeModel({"mild": 0.5, "rude": 0.93, "vile": 0.995})
    policy = ModerationPolicy(tenants={"strict": TenantPolicy(classifier=ClassifierThresholds(0.4, 0.99))})
    moderator = ClassifierModerator(policy, predict=model)
    verdicts = moderator.check_many([("mild", "shop"), ("rude", "shop"), ("vile", "shop"), ("", "shop"),
                                     ("mild", "strict"), ("vile", "strict")])
    assert [x.action for x in verdicts] == ["allow", "review", "review", "allow", "review", "block"]
    assert model.calls == [["mild", "rude", "vile", "mild", "vile"]]  # one call, the empty text not scored
    assert verdicts[1].score == 0.93 and verdicts[1].rule == "classifier:offensive_language>=0.9"
    assert verdicts[5].rule == "classifier:offensive_language>=0.99"


def test_the_shipped_classifier_flags_a_toxic_prompt_and_passes_a_clean_one() -> None:
    pytest.importorskip("profanity_check", reason="alt-profanity-check is not installed")
    from processors.text_classifier import ClassifierModerator

    policy = ModerationPolicy(tenants={"strict": TenantPolicy(classifier=ClassifierThresholds(0.5, 0.9))})
    moderator = ClassifierModerator(policy)
    clean = moderator.check("a red leather handbag on a white background, studio light", "shop")
    toxic = moderator.check("you are a fucking idiot, stupid ugly bitch", "shop")
    assert clean.action == "allow" and clean.score is not None and clean.score < 0.3
    assert toxic.action == "review" and toxic.score is not None and toxic.score > 0.95
    assert moderator.check("you are a fucking idiot, stupid ugly bitch", "strict").action == "block"


def test_the_shipped_classifier_loads_and_scores_with_sockets_refused() -> None:
    pytest.importorskip("profanity_check", reason="alt-profanity-check is not installed")
    import subprocess
    import sys

    script = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise OSError('network refused by the test')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "import json\nfrom processors.text_classifier import load_profanity_model\n"
        "print(json.dumps(load_profanity_model()(['shit', 'a lamp'])))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    toxic, clean = json.loads(done.stdout)
    assert toxic > 0.9 > clean


def test_the_direct_scorer_gives_the_packages_own_probabilities() -> None:
    pytest.importorskip("profanity_check", reason="alt-profanity-check is not installed")
    from profanity_check import profanity_check

    from processors.text_classifier import linear_scorer

    texts = ["a red leather handbag on a white background", "you are a fucking idiot", "shit", "gore and blood",
             "一盏台灯", "lamp " * 200, "!!!", "the and of", ""]
    direct = linear_scorer(profanity_check.vectorizer, profanity_check.model)
    assert direct is not None
    expected = [float(p) for p in profanity_check.predict_prob(texts)]
    assert direct(texts) == pytest.approx(expected, abs=1e-12)
    assert direct(texts[1:2])[0] > 0.9 > direct(texts[:1])[0]


def test_a_model_of_another_shape_is_left_to_the_package() -> None:
    from types import SimpleNamespace

    import numpy as np

    from processors.text_classifier import linear_scorer

    assert linear_scorer(object(), SimpleNamespace(method="isotonic", calibrated_classifiers_=[1],
                                                   classes_=[0, 1])) is None
    multi = SimpleNamespace(estimator=SimpleNamespace(coef_=np.zeros((3, 4)), intercept_=[0, 0, 0]),
                            calibrators=[SimpleNamespace(a_=1.0, b_=0.0)] * 3)
    assert linear_scorer(object(), SimpleNamespace(method="sigmoid", calibrated_classifiers_=[multi],
                                                   classes_=[0, 1])) is None
