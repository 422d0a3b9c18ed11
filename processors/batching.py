"""What may share a batch, and how a batch is cut from the buffered requests.

Requests render together only when every pipeline argument that must be equal across a batch is equal: that set
is the `CompatKey`. `BatchBuffer` holds the buffered requests indexed by (priority, key) in arrival order, so that
cutting a batch costs O(batch size) however many thousands of requests wait, and any single request can be
removed in O(1) (expired, revoked, taken by a batch of another class).

Cutting rule (`BatchBuffer.plan`): the head of the chosen class (its oldest request) decides the key; the batch
takes same-key requests of the chosen class in arrival order, then same-key requests of the other classes in
priority order, while the sum of `cost` stays within `max_batch_size`. Within one (class, key) queue the cut
stops at the first request that does not fit, so a large request is never overtaken by later ones of its own
queue. A head larger than `max_batch_size` forms a batch of its own.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
PRIORITY_LEVEL: dict[str, int] = {p: level for level, p in enumerate(PRIORITIES)}  # 0 is the most urgent


@dataclass(frozen=True)
class CompatKey:
    """Arguments that must be equal for requests to render in one pipeline call."""

    model: str
    model_version: str
    width: int
    height: int
    steps: int
    guidance: float
    extra: tuple = ()  # a record's own coordinates when it must render alone (a worker died holding it)


@dataclass
class Pending:
    """A decoded request waiting for a batch; `payload` is opaque here."""

    request_id: str
    priority: str
    key: CompatKey
    source: tuple[str, int, int]  # (topic, partition, offset)
    enqueued_at: float  # monotonic seconds
    deadline: float | None  # monotonic seconds; None: no deadline
    payload: Any  # the caller's; never looked into here
    cost: int = 1  # images to render; a batch is bounded by the sum of costs

    def __post_init__(self) -> None:
        if self.priority not in PRIORITY_LEVEL:
            raise ValueError(f"unknown priority {self.priority!r}; expected one of {PRIORITIES}")
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 1:
            raise ValueError(f"cost must be an int >= 1, got {self.cost!r}")

    @property
    def partition(self) -> tuple[str, int]:
        return self.source[0], self.source[1]


@dataclass(frozen=True)
class Batch:
    id: str
    key: CompatKey
    items: tuple[Pending, ...]
    formed_at: float
    reason: str  # "full" | "timeout" | "flush"

    @property
    def cost(self) -> int:
        return sum(item.cost for item in self.items)


@dataclass(frozen=True)
class BatchPlan:
    """A batch cut but not yet taken out of the buffer."""

    key: CompatKey
    seqs: tuple[int, ...]
    items: tuple[Pending, ...]
    full: bool  # waiting cannot make it larger: the size is reached or a same-key request was left over

    @property
    def head(self) -> Pending:
        return self.items[0]


class BatchBuffer:
    """Buffered requests indexed by priority and by (priority, key), each in arrival order."""

    def __init__(self) -> None:
        self._next_seq = 0
        self._items: dict[int, Pending] = {}
        # OrderedDict rather than dict or deque: O(1) oldest entry and O(1) removal from the middle.
        self._by_class: dict[str, OrderedDict[int, Pending]] = {p: OrderedDict() for p in PRIORITIES}
        self._by_class_key: dict[str, dict[CompatKey, OrderedDict[int, Pending]]] = {p: {} for p in PRIORITIES}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, seq: int) -> bool:
        return seq in self._items

    def __iter__(self) -> Iterator[Pending]:
        """Every buffered request, in arrival order."""
        return iter(list(self._items.values()))

    def count(self, priority: str) -> int:
        return len(self._by_class[priority])

    def add(self, item: Pending) -> int:
        """Buffers `item`; returns its sequence number (arrival order, never reused)."""
        seq = self._next_seq
        self._next_seq += 1
        self._items[seq] = item
        self._by_class[item.priority][seq] = item
        self._by_class_key[item.priority].setdefault(item.key, OrderedDict())[seq] = item
        return seq

    def remove(self, seq: int) -> Pending:
        item = self._items.pop(seq)
        del self._by_class[item.priority][seq]
        queues = self._by_class_key[item.priority]
        queue = queues[item.key]
        del queue[seq]
        if not queue:
            del queues[item.key]
        return item

    def remove_where(self, predicate: Callable[[Pending], bool]) -> list[Pending]:
        """Removes every request matching `predicate`, O(buffered); returns them in arrival order."""
        doomed = [seq for seq, item in self._items.items() if predicate(item)]
        return [self.remove(seq) for seq in doomed]

    def head(self, priority: str) -> Pending | None:
        queue = self._by_class[priority]
        return queue[next(iter(queue))] if queue else None

    def plan(self, priority: str, max_batch_size: int, riders: bool = True) -> BatchPlan | None:
        """Cuts the batch headed by the oldest request of `priority` (see the module docstring); None if empty.
        Without `riders` the batch takes requests of `priority` only."""
        head = self.head(priority)
        if head is None:
            return None
        order = (priority,) + (tuple(p for p in PRIORITIES if p != priority) if riders else ())
        seqs: list[int] = []
        items: list[Pending] = []
        total = 0
        left_over = False
        for cls in order:
            queue = self._by_class_key[cls].get(head.key)
            if not queue:
                continue
            for seq, item in queue.items():
                if total >= max_batch_size:
                    break
                if items and total + item.cost > max_batch_size:
                    left_over = True
                    break
                seqs.append(seq)
                items.append(item)
                total += item.cost
            if total >= max_batch_size:
                break
        return BatchPlan(head.key, tuple(seqs), tuple(items), full=total >= max_batch_size or left_over)

    def take(self, plan: BatchPlan) -> tuple[Pending, ...]:
        """Removes the requests of `plan`, which must have been cut from the buffer's current state."""
        return tuple(self.remove(seq) for seq in plan.seqs)
