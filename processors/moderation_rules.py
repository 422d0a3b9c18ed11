"""The default prompt rules: categories of terms and patterns in English and Chinese (simplified and
traditional), each with a severity and the action it takes unless a policy file says otherwise.

Term syntax (see processors/moderation.py for how text is normalized first):
- a Latin term is one or more words; a word ending in `*` matches any word it begins ("porn*": porno,
  pornographic); words match whole, so "rapist" does not match inside "therapist";
- a term with CJK characters matches as a substring, separators between the characters ignored;
- a pattern is a regular expression over the normalized text, whose Latin words are separated by one space.

Words that are ordinary product vocabulary on their own ("nude" heels, "paint stripper", baby-bottle "nipples",
"bloody mary" mix, 黄色 which is also "yellow", 买票 which is also "buy tickets") are left out, or matched only
in combinations that say what is meant.
"""
from __future__ import annotations

from typing import Any

SEVERITIES = ("low", "medium", "high", "critical")

DEFAULT_CATEGORIES: dict[str, dict[str, Any]] = {
    # Sexual content involving minors: locked, so no tenant policy can lower it below block.
    "sexual_minors": {
        "severity": "critical",
        "action": "block",
        "locked": True,
        "terms": ["child porn*", "kiddie porn*", "underage sex*", "underage nude*", "loli hentai",
                  "儿童色情", "兒童色情", "幼女色情", "未成年色情", "萝莉色情", "蘿莉色情"],
        "patterns": [
            r"\b(child|children|kid|kids|minor|minors|underage|preteen|toddler|schoolgirl|schoolboy)s?\b"
            r"(\W+\w+){0,3}\W+(porn\w*|nude|nudes|naked|sex|sexual|sexy|erotic\w*|nsfw|topless|undress\w*)\b",
            r"\b(porn\w*|nude|nudes|naked|sex|sexual|sexy|erotic\w*|nsfw|topless)\b(\W+\w+){0,3}\W+"
            r"(child|children|kid|kids|minor|minors|underage|preteen|toddler)s?\b",
        ],
    },
    "sexual": {
        "severity": "high",
        "action": "block",
        "terms": ["nsfw", "porn*", "xxx", "hentai", "erotic*", "sex scene", "sex act*", "having sex", "sexual act*",
                  "intercourse", "blowjob*", "genitals", "genitalia", "penis", "vagina", "fully nude",
                  "nude woman", "nude women", "nude man", "nude men", "nude girl*", "nude boy*", "nude body",
                  "nude photo*", "nude model*", "naked woman", "naked women", "naked man", "naked men",
                  "naked girl*", "naked body", "onlyfans",
                  "色情", "裸体", "裸體", "裸照", "全裸", "淫秽", "淫穢", "淫荡", "淫蕩", "性爱", "性愛", "做爱",
                  "做愛", "性交", "露点", "露點", "三级片", "三級片", "黄色图片", "黃色圖片", "黄色视频",
                  "黃色視頻", "成人视频", "成人影片", "脱衣", "脫衣"],
        "patterns": [r"\bs\W?e\W?x\W?y?\s+(photo|image|picture|pic|video)s?\b"],
    },
    # The spec's "explicit": ambiguous on its own (an "explicit seed", "explicit lyrics"), so it asks a person.
    "suggestive": {
        "severity": "medium",
        "action": "review",
        "terms": ["explicit", "naked", "topless", "nudity", "undress*", "裸露", "半裸"],
    },
    "violence": {
        "severity": "high",
        "action": "block",
        "terms": ["violent", "violence", "gore", "gory", "gruesome", "dismember*", "decapitat*", "behead*",
                  "mutilat*", "disembowel*", "massacre*", "execution video",
                  "blood soaked", "bloodbath", "mass shooting", "school shooting", "terrorist attack*",
                  "暴力", "血腥", "斩首", "斬首", "肢解", "分尸", "分屍", "虐杀", "虐殺", "屠杀", "屠殺", "碎尸",
                  "碎屍", "枪杀", "槍殺", "恐怖袭击", "恐怖襲擊"],
        "patterns": [r"\b(cut|cutting|chopped|chopping)\s+off\s+(his|her|their|a|the)?\s*(head|limb|arm|leg)s?\b"],
    },
    # Words that also name books, films and games ("murder mystery"): a person decides.
    "violence_mild": {
        "severity": "medium",
        "action": "review",
        "terms": ["murder*", "torture*", "slaughter*", "虐待", "杀戮", "殺戮", "谋杀", "謀殺"],
    },
    "self_harm": {
        "severity": "high",
        "action": "block",
        "terms": ["self harm*", "self injur*", "self mutilat*", "suicid*", "kill myself", "kill yourself",
                  "kill himself", "kill herself", "killing myself", "end my life", "slit wrist*", "slit my wrist*",
                  "cutting myself", "hang myself", "hanging myself",
                  "自残", "自殘", "自杀", "自殺", "自伤", "自傷", "割腕", "轻生", "輕生", "上吊", "寻死", "尋死"],
    },
    "election_manipulation": {
        "severity": "high",
        "action": "block",
        "terms": ["election manipulation", "election fraud", "election rigging", "rigged election*",
                  "rig the election", "rigging the election", "manipulate the election", "stolen election",
                  "steal the election", "vote rigging", "voter fraud", "ballot stuffing", "ballot box stuffing",
                  "fake ballot*", "voter suppression", "vote buying", "buy votes",
                  "选举舞弊", "選舉舞弊", "操纵选举", "操縱選舉", "选举操纵", "選舉操縱", "操控选举", "操控選舉",
                  "选举造假", "選舉造假", "选票造假", "選票造假", "假选票", "假選票", "贿选", "賄選", "作票",
                  "舞弊选举", "舞弊選舉", "窃取选举", "竊取選舉", "篡改选票", "竄改選票"],
    },
}
