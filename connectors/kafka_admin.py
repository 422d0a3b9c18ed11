"""Topic administration: declared topics created and checked (partitions, configs, replication), broker readiness,
group lag."""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from connectors.retry import until_done


@dataclass(frozen=True)
class TopicWanted:
    name: str
    partitions: int
    config: dict[str, str]


class InvalidReplication(ValueError):
    """A replication factor or min.insync.replicas that this cluster cannot honour."""


def replication_defaults(brokers: int, replication_factor: int | None = None,
                         min_insync_replicas: int | None = None) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for a cluster of `brokers` live brokers.

    Defaults: min(3, brokers) replicas; min.insync.replicas 2 where there are 3 replicas or more (an acked write
    survives the loss of one broker), else 1.
    """
    rf = replication_factor if replication_factor is not None else max(1, min(3, brokers))
    if rf < 1:
        raise InvalidReplication(f"replication factor must be at least 1, got {rf}")
    if rf > brokers:
        raise InvalidReplication(f"replication factor {rf} needs at least {rf} brokers, but the cluster has "
                                 f"{brokers} live broker{'s' if brokers != 1 else ''}")
    isr = min_insync_replicas if min_insync_replicas is not None else (2 if rf >= 3 else 1)
    if not 1 <= isr <= rf:
        raise InvalidReplication(f"min.insync.replicas {isr} must be between 1 and the replication factor {rf}: "
                                 "above it no write could succeed")
    return rf, isr


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # differences that apply cannot or will not fix


def apply_topics(base: dict[str, str], wanted: Iterable[TopicWanted], *, fix: bool = True,
                 timeout_s: float = 30.0, replication_factor: int | None = None,
                 min_insync_replicas: int | None = None) -> TopicReport:
    """Creates missing topics, raises partition counts and sets configs that differ; reports the rest as drift.

    Created topics get `replication_factor` replicas and every topic gets `min.insync.replicas` (defaults in
    replication_defaults); InvalidReplication, before anything changes, when the cluster has too few brokers.
    Partitions are never removed and replicas never added (the admin API cannot do either): a topic with more
    partitions than declared, or fewer replicas than wanted, is drift. An existing topic's min.insync.replicas
    is never set above its own replica count, which would refuse every write.
    """
    admin = AdminClient(dict(base))
    wanted = list(wanted)
    meta = admin.list_topics(timeout=timeout_s)
    rf, isr = replication_defaults(len(meta.brokers), replication_factor, min_insync_replicas)
    report = TopicReport()
    to_create = [w for w in wanted if w.name not in meta.topics]
    if to_create and fix:
        futures = admin.create_topics(
            [NewTopic(w.name, w.partitions, rf, config={**w.config, "min.insync.replicas": str(isr)})
             for w in to_create], request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result()
                report.created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                report.unchanged.append(name)
    elif to_create:
        report.drift += [f"{w.name}: missing" for w in to_create]
    if report.created:
        _await_metadata(admin, report.created, time.monotonic() + timeout_s)

    existing = [w for w in wanted if w.name in meta.topics]
    if not existing:
        return report
    resources = [ConfigResource(ResourceType.TOPIC, w.name) for w in existing]
    described = {r.name: f.result() for r, f in admin.describe_configs(resources, request_timeout=timeout_s).items()}
    for w in existing:
        have_parts = len(meta.topics[w.name].partitions)
        changes: list[str] = []
        if have_parts < w.partitions:
            changes.append(f"partitions {have_parts} -> {w.partitions}")
            if fix:
                admin.create_partitions([NewPartitions(w.name, w.partitions)])[w.name].result()
        elif have_parts > w.partitions:
            report.drift.append(f"{w.name}: has {have_parts} partitions, declared {w.partitions} (cannot shrink)")
        have_rf = min((len(p.replicas) for p in meta.topics[w.name].partitions.values()), default=0)
        if have_rf < rf:
            report.drift.append(f"{w.name}: replication factor {have_rf}, wanted {rf} (apply cannot add replicas; "
                                "reassign the partitions with kafka-reassign-partitions)")
        current = described[w.name]
        config = {**w.config, "min.insync.replicas": str(max(1, min(isr, have_rf)))}
        differing = {k: v for k, v in config.items() if k not in current or current[k].value != v}
        if differing:
            changes.append(", ".join(f"{k}={current[k].value if k in current else '?'} -> {v}"
                                     for k, v in differing.items()))
            if fix:
                _set_configs(admin, w.name, differing, timeout_s)
        if changes and fix:
            report.updated.append(f"{w.name}: {'; '.join(changes)}")
        elif changes:
            report.drift.append(f"{w.name}: {'; '.join(changes)}")
        else:
            report.unchanged.append(w.name)
    return report


class TopicsNotVisible(TimeoutError):
    """Created topics that the brokers' metadata did not show, with a leader for every partition, in time."""


def _await_metadata(admin: AdminClient, names: list[str], deadline: float) -> None:
    """Returns once every topic of `names` is in the metadata with a leader for each partition. The controller
    acknowledges a creation before the brokers have it: a client that asked at once (a consumer assigning the new
    topic, a follower checking it exists) was told that it did not exist."""
    while True:
        topics = admin.list_topics(timeout=max(0.5, deadline - time.monotonic())).topics
        missing = [name for name in names if name not in topics
                   or any(p.leader < 0 for p in topics[name].partitions.values())]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TopicsNotVisible(f"{len(missing)} created topic(s) not in the brokers' metadata in time: "
                                   f"{', '.join(sorted(missing)[:5])}")
        time.sleep(0.05)


def _set_configs(admin: AdminClient, topic: str, values: dict[str, str], timeout_s: float) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry

    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in values.items()]
    res = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    for fut in admin.incremental_alter_configs([res], request_timeout=timeout_s).values():
        fut.result()


def wait_for_broker(base: dict[str, str], timeout_s: float = 30.0) -> None:
    try:
        until_done(lambda: AdminClient(dict(base)).list_topics(timeout=2),
                   is_infrastructure=lambda exc: isinstance(exc, KafkaException),
                   on_retry=lambda exc, attempt: None, within_s=timeout_s)
    except KafkaException as exc:
        raise RuntimeError(f"Kafka at {base.get('bootstrap.servers')} did not answer within {timeout_s:.0f}s: "
                           f"{exc}") from exc
