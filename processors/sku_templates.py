"""The SKU templates file: per catalogue (tenant), which prompt template renders each category, and how.

A TOML file (examples/sku-templates.toml), read once and checked whole when the SKU connector starts: a bad file
is a bad setting. It holds

- `[templates.<name>]`: a versioned prompt with `{placeholder}` fields (`title`, `sku_id`, `category`, `view`, or
  any attribute name of the SKU), a negative prompt, the model and its size, steps and guidance, and the views a
  SKU needs (`views = { front = "front view", ... }`: one request per view, `{view}` is its phrase);
- `[catalogues.<tenant>]`: `categories = { <category> = "<template>" }` and an optional `default` template for a
  SKU with no category; `[catalogues."*"]` serves tenants without a catalogue of their own;
- `[priorities]`: change kind -> high | normal | low, and `default` for a SKU event of another or no kind;
- `[defaults]`: what a template leaves out; `max_attribute_chars`: where an attribute value is cut.

Placeholders are plain names only: no positional fields, indexing, attribute access, conversions or format specs
(a `{color:>100000}` would let a template, or a typo, blow up every prompt).
"""
from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processors.requests import Limits

ANY_TENANT = "*"
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITIES = {"new_listing": "high", "attribute_edit": "normal", "bulk_import": "low"}
RESERVED_FIELDS = frozenset({"title", "sku_id", "category", "view"})
MAX_VIEWS = 16
MAX_ATTRIBUTE_CHARS = 200
FILE_MAX_BYTES = 1024 * 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # template and view names, template versions
_DEFAULTS: dict[str, Any] = {"model": "z-image-turbo", "width": 1024, "height": 1024, "steps": 8, "guidance": 0.0,
                             "negative_prompt": None}
_TEMPLATE_KEYS = {"version", "prompt", "views", *_DEFAULTS}
_TOP_KEYS = {"templates", "catalogues", "priorities", "defaults", "max_attribute_chars"}


class TemplateError(ValueError):
    """A templates file no connector can start with; the message is one line naming the file and the entry."""


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    prompt: str
    negative_prompt: str | None
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    views: tuple[tuple[str, str], ...]  # (view name, what `{view}` says), in the file's order
    fields: frozenset[str]  # every placeholder of the prompt and negative prompt

    @property
    def attributes(self) -> frozenset[str]:
        """The attributes a SKU must have for this template."""
        return self.fields - RESERVED_FIELDS


@dataclass(frozen=True)
class Catalogue:
    categories: Mapping[str, str]  # category -> template name
    default: str | None = None  # template of a SKU with no category


@dataclass(frozen=True)
class SkuTemplates:
    templates: Mapping[str, Template]
    catalogues: Mapping[str, Catalogue]  # tenant (or ANY_TENANT) -> its catalogue
    priorities: Mapping[str, str]  # change kind -> high | normal | low
    default_priority: str = "normal"
    max_attribute_chars: int = MAX_ATTRIBUTE_CHARS

    def catalogue_of(self, tenant: str) -> Catalogue | None:
        return self.catalogues.get(tenant, self.catalogues.get(ANY_TENANT))

    def check_against(self, limits: Limits, models: tuple[str, ...]) -> None:
        """Raises TemplateError for a template whose requests intake would refuse whatever the SKU holds."""
        for t in self.templates.values():
            where = f"templates.{t.name}"
            if t.model not in models:
                raise TemplateError(f"{where}.model: {t.model!r} is not served; known: {', '.join(models)}")
            for field, value, top in (("width", t.width, limits.max_width), ("height", t.height, limits.max_height)):
                if not limits.size_multiple <= value <= top or value % limits.size_multiple:
                    raise TemplateError(f"{where}.{field}: {value} must be a multiple of {limits.size_multiple} "
                                        f"between {limits.size_multiple} and {top}")
            if not 1 <= t.steps <= limits.max_steps:
                raise TemplateError(f"{where}.steps: {t.steps} must be between 1 and {limits.max_steps}")
            if not 0.0 <= t.guidance <= limits.max_guidance:
                raise TemplateError(f"{where}.guidance: {t.guidance} must be between 0 and {limits.max_guidance}")
            for field, text in (("prompt", t.prompt), ("negative_prompt", t.negative_prompt or "")):
                if _static_length(text) > limits.max_prompt_chars:
                    raise TemplateError(f"{where}.{field}: its fixed text alone is longer than "
                                        f"{limits.max_prompt_chars} characters")


def load_templates(path: str | Path) -> SkuTemplates:
    """The checked templates file; TemplateError (one line, naming the file) for anything wrong in it."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if len(raw) > FILE_MAX_BYTES:
            raise TemplateError(f"{len(raw)} bytes; at most {FILE_MAX_BYTES}")
        return parse_templates(tomllib.loads(raw.decode("utf-8")))
    except TemplateError as exc:
        raise TemplateError(f"{p}: {exc}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"{p}: {' '.join(str(exc).split())}") from None


def parse_templates(doc: Mapping[str, Any]) -> SkuTemplates:
    _only(doc, _TOP_KEYS, "the file")
    defaults = {**_DEFAULTS, **_table(doc, "defaults")}
    _only(defaults, set(_DEFAULTS), "defaults")
    raw_templates = _table(doc, "templates")
    if not raw_templates:
        raise TemplateError("no [templates.<name>] table")
    templates = {name: _template(name, _table(raw_templates, name, "templates"), defaults)
                 for name in raw_templates}
    raw_catalogues = _table(doc, "catalogues")
    if not raw_catalogues:
        raise TemplateError("no [catalogues.<tenant>] table")
    catalogues = {tenant: _catalogue(tenant, _table(raw_catalogues, tenant, "catalogues"), templates)
                  for tenant in raw_catalogues}
    priorities = {**DEFAULT_PRIORITIES, **_table(doc, "priorities")}
    for kind, level in priorities.items():
        if level not in PRIORITIES:
            raise TemplateError(f"priorities.{kind}: {level!r} must be one of {', '.join(PRIORITIES)}")
        _printable(kind, f"priorities.{kind}", 64)
    cap = doc.get("max_attribute_chars", MAX_ATTRIBUTE_CHARS)
    if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= 4000:
        raise TemplateError(f"max_attribute_chars: {cap!r} must be an integer between 1 and 4000")
    default_priority = priorities.pop("default", "normal")
    return SkuTemplates(templates, catalogues, priorities, default_priority, cap)


def placeholders(text: str, where: str) -> frozenset[str]:
    """The names of the `{fields}` of `text`; TemplateError for anything but a plain name."""
    names = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise TemplateError(f"{where}: {{{shown}}} must be a plain name like {{color}}")
        names.add(name)
    return frozenset(names)


def _static_length(text: str) -> int:
    return sum(len(literal) for literal, *_ in string.Formatter().parse(text))


def _template(name: str, raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> Template:
    where = f"templates.{name}"
    if not _NAME.match(name):
        raise TemplateError(f"{where}: a template name is 1-64 letters, digits, '.', '_' or '-'")
    _only(raw, _TEMPLATE_KEYS, where)
    t = {**defaults, **raw}
    version = t.get("version")
    if not isinstance(version, str) or not _NAME.match(version):
        raise TemplateError(f"{where}.version: a version string of 1-64 letters, digits, '.', '_' or '-' is needed")
    prompt = _text(t.get("prompt"), f"{where}.prompt")
    if not prompt.strip():
        raise TemplateError(f"{where}.prompt: empty")
    negative = t.get("negative_prompt")
    negative = None if negative is None else _text(negative, f"{where}.negative_prompt")
    fields = placeholders(prompt, f"{where}.prompt") | placeholders(negative or "", f"{where}.negative_prompt")
    numbers = {}
    for field in ("width", "height", "steps"):
        value = t.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TemplateError(f"{where}.{field}: {value!r} must be an integer")
        numbers[field] = value
    guidance = t.get("guidance")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
        raise TemplateError(f"{where}.guidance: {guidance!r} must be a number")
    return Template(name=name, version=version, prompt=prompt, negative_prompt=negative,
                    model=_text(t.get("model"), f"{where}.model"), guidance=float(guidance),
                    views=_views(t.get("views"), where), fields=fields, **numbers)


def _views(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, list):
        raw = {name: name for name in raw} if all(isinstance(n, str) for n in raw) else None
    if not isinstance(raw, dict) or not raw:
        raise TemplateError(f"{where}.views: a table of view name -> phrase (or a list of names) is needed")
    if len(raw) > MAX_VIEWS:
        raise TemplateError(f"{where}.views: {len(raw)} views; at most {MAX_VIEWS}")
    views = []
    for view, phrase in raw.items():
        if not _NAME.match(view):
            raise TemplateError(f"{where}.views.{view}: a view name is 1-64 letters, digits, '.', '_' or '-'")
        phrase = _text(phrase, f"{where}.views.{view}")
        if placeholders(phrase, f"{where}.views.{view}"):
            raise TemplateError(f"{where}.views.{view}: a view's phrase has no placeholders")
        views.append((view, phrase.replace("{{", "{").replace("}}", "}")))
    return tuple(views)


def _catalogue(tenant: str, raw: Mapping[str, Any], templates: Mapping[str, Template]) -> Catalogue:
    where = f"catalogues.{tenant}"
    if tenant != ANY_TENANT:
        _printable(tenant, where, 128)
    _only(raw, {"categories", "default"}, where)
    categories = _table(raw, "categories", where)
    for category, name in categories.items():
        _printable(category, f"{where}.categories", 256)
        if name not in templates:
            raise TemplateError(f"{where}.categories.{category}: no template named {name!r}")
    default = raw.get("default")
    if default is not None and default not in templates:
        raise TemplateError(f"{where}.default: no template named {default!r}")
    return Catalogue(dict(categories), default)


def _table(doc: Mapping[str, Any], key: str, where: str = "") -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise TemplateError(f"{f'{where}.' if where else ''}{key}: must be a table")
    return value


def _only(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(allowed))}")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"{where}: {value!r:.40} must be a string")
    if any(ord(c) < 0x20 and c not in "\t\n\r" for c in value):
        raise TemplateError(f"{where}: contains a control character")
    return value


def _printable(value: str, where: str, most: int) -> None:
    if not value or len(value) > most or not value.isprintable():
        raise TemplateError(f"{where}: {value[:60]!r} must be 1-{most} printable characters")
