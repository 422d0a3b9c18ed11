"""Parsers and checks for setting values that are more than a number or a word: the pool table, the Kafka
extras, the storage URL, the callback allow-list, and the masking of secrets for printing.

Pure functions (no I/O, no clients): streams/settings.py calls them while the settings object is built.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr, ValidationError

from connectors.storage import parse_store_url

_SECRET_WORDS = ("password", "passwd", "secret", "token", "sasl", "credential")
# librdkafka keys the clients set themselves for exactly-once delivery, or that have their own setting.
_OWNED_KAFKA_KEYS = {
    "bootstrap.servers": "set ZIMAGE_BOOTSTRAP_SERVERS instead",
    "group.id": "each process names its own consumer group",
    "transactional.id": "each process derives it from ZIMAGE_WORKER_ID",
    "enable.idempotence": "exactly-once delivery needs it on",
    "isolation.level": "exactly-once delivery needs read_committed",
    "enable.auto.commit": "offsets are committed inside transactions",
}
_KAFKA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_POOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")  # part of topic and consumer group names
_MODEL_NAME = re.compile(r"^[^\s,|=]+$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*$")
_URL_USERINFO = re.compile(r"(://)[^/@\s]*@")
_URL_SECRET_QUERY = re.compile(r"([?&][^=&#]*(?:password|secret|token|key|signature)[^=&#]*=)[^&#]*", re.I)
MASK = "****"


def is_secret_key(key: str) -> bool:
    """True for settings and librdkafka keys whose values are secrets (passwords, SASL, private keys, tokens)."""
    key = key.lower()
    return (any(word in key for word in _SECRET_WORDS) or key.endswith(".pem")
            or key.startswith(("ssl.key", "ssl.keystore")) or "private" in key)


def mask_url_credentials(text: str) -> str:
    """`scheme://user:pass@host` -> `scheme://****@host`, and secret-looking query values masked."""
    return _URL_SECRET_QUERY.sub(rf"\1{MASK}", _URL_USERINFO.sub(rf"\1{MASK}@", text))


def parse_pools(text: str | Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """`pool=model,pool=model` (or a mapping) -> {pool: (model,)}; each pool serves exactly one model."""
    if isinstance(text, Mapping):
        entries = [(str(p), (m,) if isinstance(m, str) else tuple(m)) for p, m in text.items()]
    else:
        entries = []
        for entry in filter(None, (e.strip() for e in text.split(","))):
            pool, sep, listed = entry.partition("=")
            if not sep:
                raise ValueError(f"entry {entry!r} is not pool=model")
            entries.append((pool.strip(), tuple(m.strip() for m in listed.split("|") if m.strip())))
    table: dict[str, tuple[str, ...]] = {}
    for pool, models in entries:
        if not _POOL_NAME.match(pool):
            raise ValueError(f"pool name {pool!r} must be 1-100 letters, digits, '_' or '-'")
        if pool in table:
            raise ValueError(f"pool {pool!r} is listed twice")
        if not models or not all(_MODEL_NAME.match(m) for m in models):
            raise ValueError(f"pool {pool!r} needs one model name without spaces, ',', '|' or '='")
        if len(models) > 1:
            raise ValueError(f"pool {pool!r} lists {len(models)} models ({'|'.join(models)}) but a worker loads "
                             f"one model, so a pool serves one: give each model its own pool "
                             f"({','.join(f'{pool}-{i}={m}' for i, m in enumerate(models))})")
        table[pool] = models
    if not table:
        raise ValueError("at least one pool=model entry is needed")
    seen = [m for ms in table.values() for m in ms]
    if len(seen) != len(set(seen)):
        raise ValueError(f"model {next(m for m in seen if seen.count(m) > 1)!r} is listed in two pools")
    return table


def format_pools(table: Mapping[str, tuple[str, ...]]) -> str:
    return ",".join(f"{pool}={'|'.join(models)}" for pool, models in table.items())


def parse_kafka_extra(value: str | Mapping[str, Any]) -> dict[str, str | SecretStr]:
    """Extra librdkafka settings: a JSON object, or `key=value,key=value` when no value has a ',' or '='.

    Values of secret keys (passwords, SASL, `*.pem`, private keys) come back as SecretStr. Error messages name
    keys and positions, never values.
    """
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif (text := value.strip()).startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON object ({exc.msg} at character {exc.pos})") from None
        if not isinstance(obj, dict):
            raise ValueError("the JSON form must be an object of key: value")
        pairs = list(obj.items())
    else:
        pairs = []
        for position, part in enumerate(filter(None, (p.strip() for p in text.split(","))), 1):
            key, sep, raw = part.partition("=")
            if not sep or "=" in raw:
                raise ValueError(f"entry {position} is not key=value; a value that contains ',' or '=' needs the "
                                 'JSON form: {"key": "value, with commas"}')
            if key.strip() in dict(pairs):
                raise ValueError(f"key {key.strip()!r} is given twice")
            pairs.append((key.strip(), raw.strip()))
    extra: dict[str, str | SecretStr] = {}
    for key, raw in pairs:
        if not isinstance(key, str) or not _KAFKA_KEY.match(key):
            raise ValueError(f"{key!r} is not a librdkafka property name")
        if key in _OWNED_KAFKA_KEYS:
            raise ValueError(f"{key!r} cannot be set here: {_OWNED_KAFKA_KEYS[key]}")
        if isinstance(raw, SecretStr):
            raw = raw.get_secret_value()
        if isinstance(raw, bool):
            raw = "true" if raw else "false"
        elif isinstance(raw, (int, float)):
            raw = str(raw)
        elif not isinstance(raw, str):
            raise ValueError(f"the value of {key!r} must be a string, a number or a boolean")
        extra[key] = SecretStr(raw) if is_secret_key(key) else raw
    return extra


def store_url_problem(url: str) -> str | None:
    """What open_object_store would refuse in this URL (s3://bucket/prefix, file:///path or a path), or None."""
    try:
        parse_store_url(url)
    except ValueError as exc:
        return str(exc)
    return None


def parse_allowlist(value: str | tuple | list) -> tuple[str, ...]:
    """Host names (lower-cased) and IP networks (`10.0.0.0/8`; a single address becomes a /32 or /128)."""
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else re.split(r"[,\s]+", text)
    else:
        items = list(value)
    allowed: list[str] = []
    for item in filter(None, (str(i).strip().strip("[]") for i in items)):
        if (network := as_network(item)) is not None:
            allowed.append(str(network))
            continue
        host = item.lower().rstrip(".")
        if not _HOST_NAME.match(host):
            raise ValueError(f"{item!r} is neither a host name nor an IP address or network (CIDR)")
        allowed.append(host)
    return tuple(allowed)


def as_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


# What the webhooks app (faust-streaming over aiokafka) can take of ZIMAGE_KAFKA_EXTRA's security settings.
WEBHOOK_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
WEBHOOK_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def webhook_security(extra: Mapping[str, str | SecretStr]) -> dict[str, str]:
    """The security settings of ZIMAGE_KAFKA_EXTRA in the terms the webhooks app takes them: protocol, mechanism,
    username, password, ca, certificate, key, key_password (the ones given). Raises ValueError for a protocol or
    mechanism aiokafka does not speak."""
    plain = {k: v.get_secret_value() if isinstance(v, SecretStr) else str(v) for k, v in extra.items()}
    protocol = plain.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in WEBHOOK_PROTOCOLS:
        raise ValueError(f"security.protocol={protocol!r} is none of {', '.join(WEBHOOK_PROTOCOLS)}")
    out = {"protocol": protocol}
    if protocol.startswith("SASL"):
        mechanism = plain.get("sasl.mechanism", plain.get("sasl.mechanisms", "GSSAPI")).upper()
        if mechanism not in WEBHOOK_SASL_MECHANISMS:
            raise ValueError(f"the webhooks process speaks SASL {', '.join(WEBHOOK_SASL_MECHANISMS)}, not "
                             f"{mechanism!r}")
        out["mechanism"] = mechanism
    names = {"sasl.username": "username", "sasl.password": "password", "ssl.ca.location": "ca",
             "ssl.certificate.location": "certificate", "ssl.key.location": "key", "ssl.key.password": "key_password"}
    out.update({name: plain[key] for key, name in names.items() if key in plain})
    return out


PATTERN_HELP = {
    "device": "must be auto, cpu, cuda, cuda:N or mps",
    "topic_prefix": "must be 1-200 letters, digits, '.', '_' or '-'",
    "s3_bucket": "must be 3-63 lower-case letters, digits, '.' or '-'",
    "attention_backend": "must be default or a diffusers attention backend name (letters, digits, '_')",
    "worker_id": "must be 1-200 printable ASCII characters without spaces",
}


def describe_errors(exc: ValidationError) -> str:
    """One line for every problem: `ZIMAGE_NAME='value': why`. Values of secret or URL settings are masked."""
    lines = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "string_pattern_mismatch" and error["loc"]:
            message = PATTERN_HELP.get(str(error["loc"][0]), message)
        if not error["loc"]:
            lines.append(message)
            continue
        name = str(error["loc"][0])
        shown = ""
        value = error.get("input")
        if error["type"] != "value_error" and isinstance(value, (str, int, float)) and name != "kafka_extra":
            text = MASK if is_secret_key(name) else mask_url_credentials(str(value))
            shown = f"={text[:80]!r}"
        lines.append(f"ZIMAGE_{name.upper()}{shown}: {message[:1].lower()}{message[1:]}")
    return " ".join("; ".join(lines).split())
