"""The stack's Kafka: its jars (resolved with Maven from ops/kafka/pom.xml), one KRaft node or three, each a broker
and a controller, their configuration and storage, and the probe that says a node answers. Standard library only."""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import string
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from stack_base import HOST, ROOT, STATE, StackError, need_command, run_tool

KAFKA_HOME = STATE / "kafka"
KAFKA_LIBS = KAFKA_HOME / "libs"
KAFKA_POM = ROOT / "ops" / "kafka" / "pom.xml"
KAFKA_TEMPLATE = ROOT / "ops" / "kafka" / "server.properties"
KAFKA_LOG4J = ROOT / "ops" / "kafka" / "log4j2.properties"
KAFKA_NODES_FILE = KAFKA_HOME / "nodes"  # how many nodes the formatted storage is for
KAFKA_CLUSTER_ID = KAFKA_HOME / "cluster-id"  # shared by the nodes of a three-node cluster


def kafka_answers(port: int, timeout: float = 1.0) -> bool:
    """A broker answers a Metadata request and lists at least one live (unfenced) broker.

    Spoken directly on the wire so readiness needs no client library. Version 4 is the oldest that
    Kafka 4.x accepts; an empty topic list keeps the reply small."""
    client_id = b"zimage-stack"
    request = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id  # api key 3 (Metadata), v4, correlation 7
    request += struct.pack(">i?", 0, False)  # topics: none; allow_auto_topic_creation: false
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            reply = b""
            while len(reply) < 16:  # size, correlation id, throttle time, broker count
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    _size, correlation, _throttle_ms, broker_count = struct.unpack(">iiii", reply[:16])
    return correlation == 7 and broker_count > 0



def ensure_kafka_libs() -> None:
    """Resolve Kafka's jars with Maven when missing or when ops/kafka/pom.xml changed since the last time."""
    stamp = KAFKA_LIBS / ".pom-sha256"
    wanted = hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == wanted and any(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        return
    mvn = need_command("mvn", "maven")
    partial = KAFKA_HOME / "libs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"kafka  resolving jars with Maven into {KAFKA_LIBS} (first run only) ...", flush=True)
    started = time.monotonic()
    run_tool([mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
              f"-DoutputDirectory={partial}", "-DincludeScope=runtime"], "resolving Kafka's jars with Maven")
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)
    partial.rename(KAFKA_LIBS)  # swap in whole so an interrupted run never leaves half a classpath
    stamp.write_text(wanted + "\n")
    print(f"kafka  jars resolved in {time.monotonic() - started:.1f} s", flush=True)



def kafka_nodes() -> int:
    """How many Kafka nodes this stack runs: ZIMAGE_KAFKA_BROKERS (1 or 3), else what its storage was formatted for."""
    asked = os.environ.get("ZIMAGE_KAFKA_BROKERS", "").strip()
    if asked not in ("", "1", "3"):
        raise StackError(f"ZIMAGE_KAFKA_BROKERS={asked!r}: the stack runs 1 or 3 Kafka nodes")
    formatted = KAFKA_NODES_FILE.read_text().strip() if KAFKA_NODES_FILE.is_file() else (
        "1" if (KAFKA_HOME / "data" / "meta.properties").exists() else "")
    if asked and formatted and asked != formatted:
        raise StackError(f"this stack's Kafka storage is formatted for {formatted} node(s), not {asked}: "
                         "`ops/stack down --purge` first")
    return int(asked or formatted or "1")


@dataclass(frozen=True)
class KafkaNode:
    node_id: int
    nodes: int
    port: int
    controller_port: int

    @property
    def home(self) -> Path:  # one node keeps the layout of .stack/kafka it always had
        return KAFKA_HOME if self.nodes == 1 else KAFKA_HOME / f"node{self.node_id}"

    @property
    def name(self) -> str:
        return "kafka" if self.nodes == 1 else f"kafka{self.node_id}"


def kafka_cluster(kafka_port: int, controller_port: int) -> list[KafkaNode]:
    nodes = kafka_nodes()
    return [KafkaNode(i + 1, nodes, kafka_port + 2 * i, controller_port + 2 * i) for i in range(nodes)]


def cluster_id() -> str:
    """One id for every node of the cluster, made once."""
    if KAFKA_CLUSTER_ID.is_file():
        return KAFKA_CLUSTER_ID.read_text().strip()
    made = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    made = "A" + made[1:]  # a leading '-' would read as an option
    KAFKA_HOME.mkdir(parents=True, exist_ok=True)
    KAFKA_CLUSTER_ID.write_text(made + "\n")
    return made


def prepare_kafka(node: KafkaNode, cluster: list[KafkaNode]) -> list[str]:
    java = need_command("java", "default-jre-headless")
    ensure_kafka_libs()
    data_dir, logs_dir, config = node.home / "data", node.home / "logs", node.home / "server.properties"
    logs_dir.mkdir(parents=True, exist_ok=True)
    if node.nodes == 1:
        quorum = f"controller.quorum.bootstrap.servers={HOST}:{node.controller_port}"
    else:
        quorum = "controller.quorum.voters=" + ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in cluster)
    replicas = min(3, node.nodes)
    config.write_text(string.Template(KAFKA_TEMPLATE.read_text()).substitute(
        node_id=node.node_id, quorum=quorum, kafka_port=node.port, controller_port=node.controller_port,
        data_dir=data_dir, replicas=replicas, min_isr=2 if replicas >= 3 else 1))
    classpath = f"{KAFKA_LIBS}/*"
    logging = [f"-Dkafka.logs.dir={logs_dir}", f"-Dlog4j2.configurationFile={KAFKA_LOG4J}"]
    if not (data_dir / "meta.properties").exists():
        # KRaft storage is formatted once: one node with --standalone (it is the whole controller quorum); three
        # with the static quorum their configuration names, under one cluster id.
        ident = cluster_id()
        standalone = ["--standalone"] if node.nodes == 1 else []
        run_tool([java, *logging, "-cp", classpath, "kafka.tools.StorageTool", "format", *standalone,
                  "-t", ident, "-c", str(config)], "formatting Kafka's storage")
        KAFKA_NODES_FILE.write_text(f"{node.nodes}\n")
        print(f"{node.name:<6} storage formatted (cluster id {ident})", flush=True)
    # ZGC: G1's young pauses averaged 24 ms on two cores, and every transaction or fetch caught in one waited it out
    # (the tail of each hop of the pipeline); ZGC's pauses stay under a millisecond for a little more CPU.
    # C1 only (TieredStopAtLevel=1): this stack lives minutes (tests, the demo, the benchmarks) on a couple of cores,
    # and C2 spent 41 s of CPU compiling in a broker's first five minutes (C1 alone: 4 s), which took the cores from
    # the pipeline it served: the broker's CPU per request was 0.43 ms on average then, and 0.22 ms with C1 only.
    heap = "1g" if node.nodes == 1 else "512m"
    return [java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseZGC", "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true", *logging, "-cp", classpath, "kafka.Kafka",
            str(config)]


def abort_hanging_transactions(addresses: list[str], logs_dir: Path) -> int:
    """Kafka's `kafka-transactions find-hanging` on every node, then `abort` for each transaction found; returns
    how many were aborted."""
    java = need_command("java", "default-jre-headless")
    tool = [java, f"-Dkafka.logs.dir={logs_dir}", f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            "-cp", f"{KAFKA_LIBS}/*",
            "org.apache.kafka.tools.TransactionsCommand", "--bootstrap-server", ",".join(addresses)]
    rows = []
    for broker_id in range(1, len(addresses) + 1):
        found = subprocess.run([*tool, "find-hanging", "--broker-id", str(broker_id), "--max-transaction-timeout",
                                "1"], capture_output=True, text=True, timeout=300)
        if found.returncode != 0:
            raise StackError(f"finding hanging transactions failed:\n{found.stdout[-2000:]}{found.stderr[-2000:]}")
        rows += [[cell.strip() for cell in line.split("\t")] for line in found.stdout.splitlines()[1:] if line.strip()]
    for topic, partition, _pid, _epoch, _coordinator_epoch, start_offset, *_ in rows:
        run_tool([*tool, "abort", "--topic", topic, "--partition", partition, "--start-offset", start_offset],
                 f"aborting the hanging transaction of {topic}[{partition}] at {start_offset}")
        print(f"kafka  aborted a hanging transaction of {topic}[{partition}] from offset {start_offset}", flush=True)
    return len(rows)
