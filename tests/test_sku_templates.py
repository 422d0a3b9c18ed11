"""The SKU connector's pure core: the templates file, views, request ids, priorities, the version rule, hostile
attributes, and SkuChanged's evolution."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from processors.admission import generation_of
from processors.requests import Limits, validate
from processors.sku_requests import (
    SkuRefused,
    clean,
    priority_for,
    request_id_for,
    sku_requests,
    version_decision,
)
from processors.sku_templates import TemplateError, load_templates, parse_templates, placeholders
from schemas.serde import SCHEMA_DIR, AvroSerde
from streams.settings import InvalidSettings, load_settings
from tests.test_serde import plain_body, spec_header

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sku-templates.toml"
MODELS = ("z-image-turbo",)
SOURCE = ("zimage.sku.changes", 2, 41)

FILE = """
[defaults]
width = 64
height = 64
steps = 2
negative_prompt = "blurry"

[templates.chair]
version = "7"
prompt = "{title}, a {color} {material} chair, {view}"
views = { front = "front view", side = "side view", detail = "detail" }

[templates.lamp]
version = "1"
prompt = "{title} lamp, {view}"
views = ["front"]

[catalogues."*"]
categories = { chairs = "chair" }

[catalogues.acme]
categories = { chairs = "chair", lamps = "lamp" }
default = "lamp"
"""


def templates(text: str = FILE):
    return parse_templates(tomllib.loads(text))


def event(**fields):
    return {"sku_id": "CH-1", "tenant": "acme", "version": 3, "title": "Oslo", "category": "chairs",
            "attributes": {"color": "red", "material": "oak"}, "template": None, "priority": None,
            "change_kind": "attribute_edit", "changed_at": 1, **fields}


def render(ev, t=None):
    return sku_requests(ev, source=SOURCE, templates=t or templates(), limits=Limits(), models=MODELS, now_ms=5)


# ---- the file ---------------------------------------------------------------------------------------------------

def test_the_example_file_loads_and_fits_the_default_limits():
    t = load_templates(EXAMPLE)
    t.check_against(Limits(), MODELS)
    assert [v for v, _ in t.templates["chair"].views] == ["front", "side", "detail"]
    assert any(len(tpl.views) == 1 for tpl in t.templates.values())
    assert all(tpl.version for tpl in t.templates.values())
    assert t.catalogue_of("acme") is t.catalogues["acme"] and t.catalogue_of("globex") is t.catalogues["*"]


LAMP = '[templates.lamp]\nversion = "1"\nprompt = "{title} lamp, {view}"\nviews = ["front"]'


def lamp_file(**changes: str) -> str:
    lines = {"version": '"1"', "prompt": '"{title} lamp, {view}"', "views": '["front"]', **changes}
    assert LAMP in FILE
    return FILE.replace(LAMP, "[templates.lamp]\n" + "\n".join(f"{k} = {v}" for k, v in lines.items()))


@pytest.mark.parametrize("change, message", [
    ({"prompt": '"{title} {color:>100000}"'}, "must be a plain name"),
    ({"prompt": '"{title} {color!r}"'}, "must be a plain name"),
    ({"prompt": '"{title} {attrs[0]}"'}, "must be a plain name"),
    ({"prompt": '"{title} {}"'}, "must be a plain name"),
    ({"prompt": '"{title"'}, "literal braces"),
    ({"prompt": '"a\\u0007 bell"'}, "control character"),
    ({"version": '""'}, "version"),
    ({"version": '"1 2"'}, "version"),
    ({"width": '"big"'}, "must be an integer"),
    ({"colour": '"red"'}, "unknown key 'colour'"),
    ({"views": "{}"}, "views"),
    ({"views": '{ "front view" = "x" }'}, "view name"),
])
def test_a_bad_template_is_refused_naming_the_entry(change, message):
    with pytest.raises(TemplateError, match=r"templates\.lamp") as info:
        templates(lamp_file(**change))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_catalogue_naming_an_unknown_template_or_a_bad_priority_is_refused():
    with pytest.raises(TemplateError, match=r"catalogues\.acme\.categories\.sofas: no template named 'sofa'"):
        templates(FILE.replace('lamps = "lamp" }', 'lamps = "lamp", sofas = "sofa" }'))
    with pytest.raises(TemplateError, match=r"priorities\.bulk_import"):
        templates(FILE + '\n[priorities]\nbulk_import = "urgent"\n')


def test_templates_that_intake_would_refuse_are_refused_at_start_up():
    with pytest.raises(TemplateError, match=r"templates\.chair\.width"):
        templates(FILE.replace("width = 64", "width = 70")).check_against(Limits(), MODELS)
    with pytest.raises(TemplateError, match=r"templates\.chair\.model"):
        templates(FILE.replace("[defaults]", '[defaults]\nmodel = "sdxl"')).check_against(Limits(), MODELS)
    with pytest.raises(TemplateError, match="fixed text alone"):
        templates(FILE.replace('prompt = "{title} lamp', f'prompt = "{"x" * 5000} {{title}} lamp')).check_against(
            Limits(), MODELS)


def test_a_bad_file_is_one_line_at_start_up(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text(FILE.replace("width = 64", "width = 4096"))
    with pytest.raises(InvalidSettings) as info:
        load_settings(_env_file=None, sku_templates=str(bad))
    assert "ZIMAGE_SKU_TEMPLATES" in str(info.value) and "templates.chair.width" in str(info.value)
    assert "\n" not in str(info.value)
    bad.write_text("[templates\n")
    with pytest.raises(InvalidSettings, match=str(bad)):
        load_settings(_env_file=None, sku_templates=str(bad))
    assert load_settings(_env_file=None, sku_templates=str(EXAMPLE)).sku_template_set is not None


def test_placeholders_are_plain_names():
    assert placeholders("{title}, {color} {{literal}}", "x") == {"title", "color"}


# ---- filling a template -----------------------------------------------------------------------------------------

def test_one_valid_request_per_view_with_lineage():
    requests = render(event())
    assert [r["view"] for r in requests] == ["front", "side", "detail"]
    for r in requests:
        validate(r, Limits(), MODELS)
        assert r["prompt"].startswith("Oslo, a red oak chair, ") and r["negative_prompt"] == "blurry"
        assert (r["sku_id"], r["sku_version"], r["template_version"], r["tenant"]) == ("CH-1", 3, "7", "acme")
        assert r["sku_event"] == {"topic": SOURCE[0], "partition": 2, "offset": 41}
        assert (r["width"], r["height"], r["steps"], r["seed"]) == (64, 64, 2, None)
    assert requests[1]["prompt"].endswith("side view")
    assert len({r["request_id"] for r in requests}) == 3


def test_request_ids_come_from_tenant_sku_version_and_view_only():
    first = [r["request_id"] for r in render(event())]
    assert first == [r["request_id"] for r in render(event(attributes={"color": "blue", "material": "pine"}))]
    assert first == [request_id_for("acme", "CH-1", 3, v) for v in ("front", "side", "detail")]
    assert first[0] != render(event(version=4))[0]["request_id"]
    assert first[0] != render(event(tenant="globex"))[0]["request_id"]


def test_a_new_template_version_is_a_new_generation_under_the_same_ids():
    old = render(event())[0]
    new = render(event(), templates(FILE.replace('version = "7"', 'version = "8"')))[0]
    assert old["request_id"] == new["request_id"]
    assert generation_of(old, "tiny-v1") != generation_of(new, "tiny-v1") == "tiny-v1+template.8"


def test_the_catalogue_of_the_tenant_picks_the_template():
    assert [r["view"] for r in render(event(category="lamps"))] == ["front"]
    with pytest.raises(SkuRefused, match="unknown category 'lamps'"):
        render(event(category="lamps", tenant="globex"))  # the "*" catalogue has no lamps
    assert render(event(category=None))[0]["prompt"] == "Oslo lamp, front"  # acme's default
    with pytest.raises(SkuRefused, match="no category"):
        render(event(category=None, tenant="globex"))
    assert [r["view"] for r in render(event(category=None, template="chair"))] == ["front", "side", "detail"]


@pytest.mark.parametrize("fields, reason", [
    ({"category": "sofas"}, "unknown category 'sofas'"),
    ({"attributes": {"color": "red"}}, "needs material"),
    ({"attributes": {"color": "\x00\u202e\x1b", "material": "oak"}}, "needs color"),
    ({"title": "   "}, "needs title"),
    ({"template": "nope"}, "unknown template 'nope'"),
    ({"priority": "URGENT"}, "priority 'URGENT'"),
    ({"sku_id": "bad\x00id"}, "sku_id must be"),
])
def test_a_refusal_names_the_sku_and_never_half_fills_a_prompt(fields, reason):
    with pytest.raises(SkuRefused) as info:
        render(event(**fields))
    assert reason in str(info.value)
    assert "version 3 of tenant 'acme'" in str(info.value) and "SKU '" in str(info.value)


def test_hostile_attributes_are_cleaned_and_capped():
    t = templates("max_attribute_chars = 20\n" + FILE)
    hostile = {"color": "red\x00\x1b[31m\u202e\u200b  \n\n green", "material": "o" * 10_000}
    [front, *_] = render(event(attributes=hostile), t)
    validate(front, Limits(), MODELS)
    assert "red[31m green" in front["prompt"] and "o" * 20 + " chair" in front["prompt"]
    assert "o" * 21 not in front["prompt"] and "\u202e" not in front["prompt"]
    assert clean("a\r\nb\u2028c\td", 100) == "a b c d"


def test_a_prompt_over_the_request_limit_is_refused_whole():
    t = templates("max_attribute_chars = 4000\n" + FILE)
    with pytest.raises(SkuRefused, match="intake refuses: prompt is"):
        render(event(attributes={"color": "r" * 3000, "material": "o" * 3000}), t)


def test_priority_follows_the_change_kind_and_the_mapping_is_configurable():
    t = templates()
    assert [priority_for(event(change_kind=k), t) for k in ("new_listing", "attribute_edit", "bulk_import")] == [
        "HIGH", "NORMAL", "LOW"]
    assert priority_for(event(change_kind=None), t) == "NORMAL" == priority_for(event(change_kind="other"), t)
    assert priority_for(event(change_kind="bulk_import", priority="high"), t) == "HIGH"
    custom = templates(FILE + '\n[priorities]\nbulk_import = "normal"\nrestock = "high"\ndefault = "low"\n')
    assert priority_for(event(change_kind="bulk_import"), custom) == "NORMAL"
    assert priority_for(event(change_kind="restock"), custom) == "HIGH"
    assert priority_for(event(change_kind=None), custom) == "LOW"
    assert render(event(change_kind="new_listing"))[0]["priority"] == "HIGH"


def test_the_version_rule():
    assert version_decision(None, 1, backfill=False) == "new"
    assert version_decision(3, 4, backfill=False) == "new"
    assert version_decision(3, 3, backfill=False) == "repeat"
    assert version_decision(3, 2, backfill=False) == "older"
    assert version_decision(3, 3, backfill=True) == "again"  # a backfill renders the latest again
    assert version_decision(3, 2, backfill=True) == "older"  # ... never a superseded one
    assert version_decision(3, 5, backfill=True) == "new"


# ---- SkuChanged v1 -> v2 ----------------------------------------------------------------------------------------

def test_sku_changed_only_adds_fields_with_defaults_and_v1_data_still_decodes():
    v1 = json.loads((SCHEMA_DIR / "history" / "SkuChanged.v1.avsc").read_text())
    v2 = json.loads((SCHEMA_DIR / "SkuChanged.avsc").read_text())
    shape = {f["name"]: (f["type"], f.get("default", "none")) for f in v1["fields"]}
    assert {f["name"]: (f["type"], f.get("default", "none")) for f in v2["fields"] if f["name"] in shape} == shape
    added = [f for f in v2["fields"] if f["name"] not in shape]
    assert {f["name"] for f in added} == {"change_kind", "category"} and all("default" in f for f in added)
    old = {k: v for k, v in event().items() if k not in ("change_kind", "category")}
    decoded = AvroSerde().decode("SkuChanged", spec_header(v1) + plain_body(v1, old))
    assert decoded == {**old, "change_kind": None, "category": None}


# ---- the command --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("restart", ["--restart", "--no-restart"])
def test_the_command_refuses_a_missing_or_bad_file_with_one_line_and_exit_78(tmp_path, restart):
    from tests.test_cli import zimage

    unset = zimage("sku-connector", restart, ZIMAGE_SKU_TEMPLATES="", ZIMAGE_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert unset.returncode == 78 and unset.stderr.startswith("zimage: ZIMAGE_SKU_TEMPLATES is not set")
    bad = tmp_path / "t.toml"
    bad.write_text(FILE.replace('prompt = "{title} lamp, {view}"', 'prompt = "{title:>99999} lamp"'))
    out = zimage("sku-connector", restart, ZIMAGE_SKU_TEMPLATES=str(bad), ZIMAGE_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert out.returncode == 78 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"zimage: invalid configuration: ZIMAGE_SKU_TEMPLATES: {bad}: templates.lamp.prompt")
    assert zimage("sku-connector", "--help").returncode == 0
