"""The engine's queue: calls grouped by person and route into batches.

Calls about the same person for the same route waiting together leave as one
:class:`Batch`, at most 30 entries per array (:data:`~flask_koala._payload.MAX_ENTRIES`
of each kind); calls about different people, or for different routes, never share one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Optional

from ._payload import MAX_BODY_BYTES, MAX_ENTRIES, Call

__all__ = ["Batch", "PersonQueue"]


class Batch(list[Call]):
    """Calls about one person and one route, tried together.

    ``memo`` belongs to the handler: the HTTP handler keeps the encoded body there, so a
    retry sends the very same bytes without encoding them again.
    """

    __slots__ = ("attempts", "memo")

    def __init__(self, calls: Iterable[Call] = ()) -> None:
        super().__init__(calls)
        self.attempts = 0  # tries made so far, the first one included
        self.memo: object = None


_Key = tuple[str, Optional[str], Optional[str]]


class PersonQueue:
    """A FIFO of calls, grouped by person and route so that one request can carry several.

    Calls about the same person for the same route waiting together come out as one batch
    (at most 30 of each kind, i.e. of each array); the batch takes the place of the person's
    first call, and what is left over keeps its place at the front. Not thread-safe: the
    engine holds its lock around every use.
    """

    def __init__(self) -> None:
        self._people: OrderedDict[_Key, list[Call]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, call: Call) -> None:
        """Add a call at the back (or beside the same person's calls)."""
        key = (call.route, call.profile_id, call.email)
        calls = self._people.get(key)
        if calls is None:
            self._people[key] = [call]
        else:
            calls.append(call)
        self._size += 1

    def take(self) -> Batch:
        """Remove and return the oldest person's calls, at most 30 of each kind."""
        key, calls = self._people.popitem(last=False)
        batch, rest = _split(calls)
        if rest:
            self._people[key] = rest
            self._people.move_to_end(key, last=False)
        self._size -= len(batch)
        return batch

    def clear(self) -> list[Call]:
        """Remove and return everything."""
        calls = [call for group in self._people.values() for call in group]
        self._people.clear()
        self._size = 0
        return calls


def _split(calls: list[Call]) -> tuple[Batch, list[Call]]:
    """At most 30 calls of each kind, and at most :data:`MAX_BODY_BYTES` by the calls' size
    bounds (the first call always goes, having fit alone); the rest waits, in order."""
    if len(calls) <= MAX_ENTRIES and sum(call.size for call in calls) <= MAX_BODY_BYTES:
        return Batch(calls), []
    batch = Batch()
    rest: list[Call] = []
    counts: dict[str, int] = {}
    used = 0
    for call in calls:
        count = counts.get(call.kind, 0)
        if count < MAX_ENTRIES and (not batch or used + call.size <= MAX_BODY_BYTES):
            counts[call.kind] = count + 1
            used += call.size
            batch.append(call)
        else:
            rest.append(call)
    return batch, rest
