"""Who is to blame when a render fails: one request, or the device.

A batch that fails is split: each request is rendered alone, up to `attempts` times. A request that fails alone
while others succeed caused its own failure. When every request fails alone, the requests are not blamed yet:
the caller asks the device to render a known-good probe, and only if that succeeds are the failures the
requests' own. Otherwise the device is at fault, and the batch is retried later, never dead-lettered.

Pure logic over callables: the renderer, the probe and what counts as permanent are passed in.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Result = TypeVar("Result")


@dataclass
class Isolated(Generic[Result]):
    results: dict[int, Result] = field(default_factory=dict)  # request index -> what it rendered
    errors: dict[int, BaseException] = field(default_factory=dict)  # request index -> its last error

    @property
    def all_failed(self) -> bool:
        return bool(self.errors) and not self.results


def render_isolating_faults(render: Callable[[Sequence[int]], Sequence[Result]], count: int, *, attempts: int = 2,
                            permanent: Callable[[BaseException], bool] = lambda exc: False) -> Isolated[Result]:
    """`render(indexes)` renders those requests together and returns one result per index, in order.

    The whole batch is tried once; on failure each request is tried alone, up to `attempts` times (an error that
    `permanent` recognises is not retried). Returns what succeeded and the last error of what did not."""
    out: Isolated[Result] = Isolated()
    try:
        together = list(render(list(range(count))))
    except Exception as exc:  # noqa: BLE001 - any failure leads to the split below
        if count == 1 and permanent(exc):
            out.errors[0] = exc
            return out
    else:
        if len(together) != count:
            raise RuntimeError(f"render returned {len(together)} results for {count} requests")
        out.results = dict(enumerate(together))
        return out
    for index in range(count):
        for _attempt in range(attempts):
            try:
                [out.results[index]] = render([index])  # exactly one result, else this request's error
                out.errors.pop(index, None)
                break
            except Exception as exc:  # noqa: BLE001 - kept as this request's error
                out.errors[index] = exc
                if permanent(exc):
                    break
    return out
