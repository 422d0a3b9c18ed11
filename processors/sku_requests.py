"""What the SKU connector makes of one SkuChanged: the GenerationRequests of its views, or a refusal naming it.

Pure: streams/sku_connector.py feeds it decoded events, the templates (processors/sku_templates.py) and the latest
version it has seen of each SKU.

- Request ids derive from (tenant, SKU, SKU version, view): a retry, a replay or a backfill gives the same ids, and
  the gate's idempotency (tenant, request_id, generation) keeps them from rendering twice. The template version
  is not in the id but in the request's `template_version`, which is part of its generation: a template change
  renders again under the same ids.
- Attribute values are hostile: control and format characters are dropped, whitespace runs become one space, and
  a value is cut at the file's `max_attribute_chars`. A value that is empty after that counts as missing. Every
  request is checked with intake's own rules before it is produced: all views of an event, or none.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from typing import Any, Literal

from processors.requests import InvalidRequest, Limits, validate
from processors.sku_templates import SkuTemplates, Template

PRIORITY_SYMBOLS = {"high": "HIGH", "normal": "NORMAL", "low": "LOW"}
KIND_MAX_CHARS = 64
# Unicode categories dropped from attribute values: controls, format characters (bidi overrides, zero-width
# characters), surrogates, private use, unassigned, and line or paragraph separators.
_DROPPED = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}

Decision = Literal["new", "again", "repeat", "older"]


class SkuRefused(ValueError):
    """A SKU event that renders nothing: an unknown category, a missing attribute, a malformed event. The
    message names the SKU, its version and tenant."""


def request_id_for(tenant: str, sku_id: str, sku_version: int, view: str) -> str:
    digest = hashlib.sha256(json.dumps([tenant, sku_id, sku_version, view], ensure_ascii=False,
                                       separators=(",", ":")).encode("utf-8", "surrogatepass")).hexdigest()
    return f"sku-{digest[:40]}"


def sku_state_key(tenant: str, sku_id: str) -> str:
    """The key of a SKU's latest version in the connector's state and its changelog."""
    return json.dumps([tenant, sku_id], ensure_ascii=False, separators=(",", ":"))


def version_decision(latest: int | None, version: int, backfill: bool) -> Decision:
    """new: render (and remember the version); again: a backfill of the latest version, produced again under the
    same ids; repeat / older: nothing (a backfill of an older version renders nothing either: it is superseded)."""
    if latest is None or version > latest:
        return "new"
    if version == latest:
        return "again" if backfill else "repeat"
    return "older"


def priority_for(event: Mapping[str, Any], templates: SkuTemplates) -> str:
    """HIGH, NORMAL or LOW: the event's own priority when it sets one, else its change kind's."""
    asked = event.get("priority")
    if asked is not None:
        symbol = PRIORITY_SYMBOLS.get(str(asked).lower())
        if symbol is None:
            raise SkuRefused(f"{describe(event)}: priority {str(asked)[:40]!r} is not HIGH, NORMAL or LOW")
        return symbol
    kind = event.get("change_kind")
    return PRIORITY_SYMBOLS[templates.priorities.get(kind, templates.default_priority) if isinstance(kind, str)
                            else templates.default_priority]


def describe(event: Mapping[str, Any]) -> str:
    """How a refusal names the SKU: short and printable whatever the event holds."""
    def shown(value: Any) -> str:
        return repr(clean(value, 100)) if isinstance(value, str) else repr(value)[:40]

    return f"SKU {shown(event.get('sku_id'))} version {shown(event.get('version'))} of tenant " \
           f"{shown(event.get('tenant'))}"


def clean(value: str, cap: int) -> str:
    """`value` without control or format characters, whitespace runs as one space, at most `cap` characters."""
    kept = "".join(" " if c.isspace() else c for c in value if c.isspace() or unicodedata.category(c) not in _DROPPED)
    return " ".join(kept.split())[:cap].rstrip()


def choose_template(event: Mapping[str, Any], templates: SkuTemplates) -> Template:
    tenant, category, named = event.get("tenant"), event.get("category"), event.get("template")
    catalogue = templates.catalogue_of(tenant) if isinstance(tenant, str) else None
    if catalogue is None:
        raise SkuRefused(f"{describe(event)}: no catalogue for this tenant in the templates file")
    if named is not None:
        template = templates.templates.get(named) if isinstance(named, str) else None
        if template is None:
            raise SkuRefused(f"{describe(event)}: unknown template {clean(str(named), 100)!r}")
        return template
    if category is not None:
        name = catalogue.categories.get(category) if isinstance(category, str) else None
        if name is None:
            known = ", ".join(sorted(catalogue.categories)[:20])
            raise SkuRefused(f"{describe(event)}: unknown category {clean(str(category), 100)!r} (known: {known})")
        return templates.templates[name]
    if catalogue.default is None:
        raise SkuRefused(f"{describe(event)}: no category, and the catalogue has no default template")
    return templates.templates[catalogue.default]


def sku_requests(event: Mapping[str, Any], *, source: tuple[str, int, int], templates: SkuTemplates,
                 limits: Limits, models: tuple[str, ...] | None, now_ms: int) -> list[dict[str, Any]]:
    """One GenerationRequest per view of the SKU's template, each valid for intake; or SkuRefused."""
    sku_id, tenant, version = _identity(event, limits)
    template = choose_template(event, templates)
    priority = priority_for(event, templates)
    values = _values(event, template, templates.max_attribute_chars)
    topic, partition, offset = source
    kind = event.get("change_kind")
    metadata = {"sku_template": template.name, "sku_category": clean(str(event.get("category") or ""), 256)}
    if isinstance(kind, str) and clean(kind, KIND_MAX_CHARS):
        metadata["sku_change_kind"] = clean(kind, KIND_MAX_CHARS)
    requests = []
    for view, phrase in template.views:
        filled = {**values, "view": phrase}
        request = {
            "request_id": request_id_for(tenant, sku_id, version, view), "tenant": tenant, "sku_id": sku_id,
            "prompt": template.prompt.format_map(filled),
            "negative_prompt": None if template.negative_prompt is None else template.negative_prompt.format_map(
                filled),
            "model": template.model, "width": template.width, "height": template.height, "steps": template.steps,
            "guidance": template.guidance, "seed": None, "num_images": 1, "priority": priority,
            "callback_url": None, "deadline": None, "submitted_at": now_ms, "metadata": metadata,
            "sku_version": version, "view": view, "template_version": template.version,
            "sku_event": {"topic": topic, "partition": partition, "offset": offset}, "admission": None,
        }
        try:
            validate(request, limits, models)
        except InvalidRequest as exc:
            raise SkuRefused(f"{describe(event)}: view {view} of template {template.name} gives a request that "
                             f"intake refuses: {exc.reason}") from None
        requests.append(request)
    return requests


def _identity(event: Mapping[str, Any], limits: Limits) -> tuple[str, str, int]:
    sku_id, tenant, version = event.get("sku_id"), event.get("tenant"), event.get("version")
    if not isinstance(sku_id, str) or not sku_id or len(sku_id) > limits.max_sku_id_chars \
            or not sku_id.isprintable():
        raise SkuRefused(f"{describe(event)}: sku_id must be 1-{limits.max_sku_id_chars} printable characters")
    if not isinstance(tenant, str) or not tenant.strip() or len(tenant) > limits.max_tenant_chars \
            or not tenant.isprintable():
        raise SkuRefused(f"{describe(event)}: tenant must be 1-{limits.max_tenant_chars} printable characters")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SkuRefused(f"{describe(event)}: version must be a non-negative integer")
    return sku_id, tenant, version


def _values(event: Mapping[str, Any], template: Template, cap: int) -> dict[str, str]:
    """Every placeholder's value, cleaned; SkuRefused naming each attribute that is missing or empty."""
    attributes = event.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise SkuRefused(f"{describe(event)}: attributes must be a map of strings")
    given = {"title": event.get("title"), "sku_id": event.get("sku_id"), "category": event.get("category")}
    values: dict[str, str] = {}
    missing = []
    for name in sorted(template.fields - {"view"}):
        raw = given[name] if name in given else attributes.get(name)
        text = clean(raw, cap) if isinstance(raw, str) else ""
        if not text:
            missing.append(name)
        values[name] = text
    if missing:
        raise SkuRefused(f"{describe(event)}: template {template.name} needs {', '.join(missing)}, which the SKU "
                         f"does not have (or has empty)")
    return values
