"""Topic administration's replication rules, against an in-memory admin client (no broker)."""
from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from connectors import kafka_admin
from connectors.kafka_admin import (
    InvalidReplication,
    TopicsNotVisible,
    TopicWanted,
    apply_topics,
    replication_defaults,
)


def done(value: object = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class FakeAdmin:
    """A cluster of `brokers` brokers holding `topics` (name -> (partitions, replicas, configs))."""

    def __init__(self, brokers: int, topics: dict[str, tuple[int, int, dict[str, str]]]):
        self.brokers = brokers
        self.topics = topics
        self.created: list = []
        self.altered: dict[str, dict[str, str]] = {}
        self.metadata_lag = 0  # metadata requests that still miss a created topic, as brokers lag the controller
        self.lagging: dict[str, int] = {}  # created topic -> metadata requests left before it shows
        self.leaderless: set[str] = set()  # shown without a leader for their partitions
        self.listed = 0

    def __call__(self, _conf: dict) -> FakeAdmin:
        return self

    def list_topics(self, timeout: float) -> SimpleNamespace:
        self.listed += 1
        shown = {name: spec for name, spec in self.topics.items() if self.lagging.get(name, 0) == 0}
        self.lagging = {name: left - 1 for name, left in self.lagging.items() if left > 0}
        return SimpleNamespace(
            brokers={i: object() for i in range(self.brokers)},
            topics={name: SimpleNamespace(partitions={
                p: SimpleNamespace(replicas=list(range(rf)), leader=-1 if name in self.leaderless else 0)
                for p in range(parts)}) for name, (parts, rf, _) in shown.items()})

    def create_topics(self, new_topics: list, request_timeout: float) -> dict[str, Future]:
        self.created += new_topics
        for t in new_topics:
            self.topics[t.topic] = (t.num_partitions, t.replication_factor, dict(t.config))
            self.lagging[t.topic] = self.metadata_lag
        return {t.topic: done() for t in new_topics}

    def describe_configs(self, resources: list, request_timeout: float) -> dict:
        return {r: done({k: SimpleNamespace(value=v) for k, v in self.topics[r.name][2].items()})
                for r in resources}

    def incremental_alter_configs(self, resources: list, request_timeout: float) -> dict:
        for r in resources:
            self.altered[r.name] = {e.name: e.value for e in r.incremental_configs}
        return {r: done() for r in resources}


@pytest.fixture
def cluster(monkeypatch):
    def make(brokers: int, **topics: tuple[int, int, dict[str, str]]) -> FakeAdmin:
        admin = FakeAdmin(brokers, topics)
        monkeypatch.setattr(kafka_admin, "AdminClient", admin)
        return admin
    return make


WANTED = [TopicWanted("t.requests", 3, {"retention.ms": "1000"})]


@pytest.mark.parametrize("brokers, rf, isr", [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2)])
def test_defaults_follow_the_number_of_brokers(brokers, rf, isr):
    assert replication_defaults(brokers) == (rf, isr)


def test_impossible_replication_is_refused_with_a_clear_message():
    with pytest.raises(InvalidReplication, match=r"replication factor 3 needs at least 3 brokers, but the cluster "
                                                 r"has 1 live broker$"):
        replication_defaults(1, 3)
    with pytest.raises(InvalidReplication, match=r"min\.insync\.replicas 3 must be between 1 and the replication "
                                                 r"factor 2"):
        replication_defaults(3, 2, 3)


def test_created_topics_get_the_replication_factor_and_min_insync_replicas(cluster):
    admin = cluster(3)
    report = apply_topics({}, WANTED)  # the two-argument call of the harness, the demo and the benchmarks
    assert report.created == ["t.requests"]
    (topic,) = admin.created
    assert (topic.num_partitions, topic.replication_factor) == (3, 3)
    assert topic.config == {"retention.ms": "1000", "min.insync.replicas": "2"}


def test_too_many_replicas_fail_before_anything_changes(cluster):
    admin = cluster(1)
    with pytest.raises(InvalidReplication):
        apply_topics({}, WANTED, replication_factor=3)
    assert admin.created == []


def test_existing_topic_with_too_few_replicas_is_drift_named_replication(cluster):
    admin = cluster(3, **{"t.requests": (3, 1, {"retention.ms": "1000", "min.insync.replicas": "1"})})
    report = apply_topics({}, WANTED, fix=False)
    assert report.drift == ["t.requests: replication factor 1, wanted 3 (apply cannot add replicas; reassign the "
                            "partitions with kafka-reassign-partitions)"]
    fixed = apply_topics({}, WANTED)
    # still drift after apply, and min.insync.replicas is not raised above the topic's one replica
    assert fixed.drift == report.drift and fixed.unchanged == ["t.requests"] and admin.altered == {}


def test_existing_topic_gets_min_insync_replicas_set(cluster):
    admin = cluster(3, **{"t.requests": (3, 3, {"retention.ms": "1000", "min.insync.replicas": "1"})})
    check = apply_topics({}, WANTED, fix=False)
    assert check.drift == ["t.requests: min.insync.replicas=1 -> 2"] and admin.altered == {}
    report = apply_topics({}, WANTED)
    assert report.updated == ["t.requests: min.insync.replicas=1 -> 2"]
    assert admin.altered == {"t.requests": {"min.insync.replicas": "2"}}


def test_created_topics_are_awaited_until_the_brokers_metadata_shows_them(cluster):
    admin = cluster(1)
    admin.metadata_lag = 3  # the controller acknowledged; the broker answering metadata does not know them yet
    report = apply_topics({}, WANTED)
    assert report.created == ["t.requests"]
    assert admin.lagging == {} and admin.listed >= 1 + 4  # the first look, then until the topic showed


def test_created_topics_that_never_show_with_leaders_fail_with_their_names(cluster):
    admin = cluster(1)
    admin.leaderless = {"t.requests"}
    with pytest.raises(TopicsNotVisible, match=r"t\.requests"):
        apply_topics({}, WANTED, timeout_s=0.3)
