"""The engine's queue: calls grouped by person and route into batches.

Calls about the same person for the same route waiting together leave as one
:class:`Batch`, at most 30 entries per array (:data:`~flask_koala._payload.MAX_ENTRIES`
of each kind); calls about different people, or for different routes, never share one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Optional, Union

from ._payload import MAX_BODY_BYTES, MAX_ENTRIES, ROUTES, Call

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


# A group of calls about one person for one route: a lone call as itself, several in a list.
_Group = Union[Call, list[Call]]
# A group's key: the profile id (the common case), or (route, profile id, email) for a
# second group about the same profile id (another email, another route).
_Key = Union[Optional[str], tuple[str, Optional[str], Optional[str]]]


class PersonQueue:
    """A FIFO of calls, grouped by person and route so that one request can carry several.

    Calls about the same person for the same route waiting together come out as one batch
    (at most 30 of each kind, i.e. of each array); the batch takes the place of the person's
    first call, and what is left over keeps its place at the front. Not thread-safe: the
    engine holds its lock around every use.

    A backlog of thousands of calls is mostly one call per person, so it is laid out for
    memory (20 to 45 bytes a call besides the calls themselves, about 30 for 10,000): a
    group is keyed by the profile id its calls already hold, a lone call is its own group,
    and the order is a deque of keys (a plain dict's insertion order would do, but taking
    from its front costs O(n) in CPython). Only a second group about one profile id (another
    email, another route), which is rare, pays for a key tuple, in a table of its own.
    """

    def __init__(self) -> None:
        self._groups: dict[Optional[str], _Group] = {}
        self._others: dict[tuple[str, Optional[str], Optional[str]], list[Call]] = {}
        self._order: deque[_Key] = deque()  # one key per group, oldest first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, call: Call) -> None:
        """Add a call at the back (or beside the same person's calls)."""
        self._size += 1
        profile_id = call.profile_id
        group = self._groups.get(profile_id)
        if group is None:
            if not self._others:  # the common case: nobody else to look for
                self._groups[profile_id] = call
                self._order.append(profile_id)
                return
        else:
            first = group[0] if isinstance(group, list) else group
            if call.email == first.email and (call.kind == first.kind or call.route == first.route):
                if isinstance(group, list):
                    group.append(call)
                else:
                    self._groups[profile_id] = [group, call]
                return
        # Another email or route of this profile id, or of one whose first group left.
        key = (ROUTES[call.kind], profile_id, call.email)  # call.route, without a call
        others = self._others.get(key)
        if others is not None:
            others.append(call)
        elif group is None:
            self._groups[profile_id] = call
            self._order.append(profile_id)
        else:
            self._others[key] = [call]
            self._order.append(key)

    def oldest(self) -> Optional[float]:
        """When the call at the front was made (its ``timestamp``); ``None`` when empty."""
        if not self._order:
            return None
        group = self._group(self._order[0])
        return (group[0] if isinstance(group, list) else group).timestamp

    def take(self) -> Batch:
        """Remove and return the oldest person's calls, at most 30 of each kind."""
        key = self._order.popleft()
        group: _Group = self._others.pop(key) if isinstance(key, tuple) else self._groups.pop(key)
        if not isinstance(group, list):
            self._size -= 1
            return Batch((group,))
        batch, rest = _split(group)
        if rest:
            if isinstance(key, tuple):
                self._others[key] = rest
            else:
                self._groups[key] = rest
            self._order.appendleft(key)
        self._size -= len(batch)
        return batch

    def __iter__(self) -> Iterator[Call]:
        """Every call waiting, oldest group first; the queue stays as it is."""
        for key in self._order:
            group = self._group(key)
            if isinstance(group, list):
                yield from group
            else:
                yield group

    def clear(self) -> list[Call]:
        """Remove and return everything, oldest group first."""
        calls = list(self)
        self._groups.clear()
        self._others.clear()
        self._order.clear()
        self._size = 0
        return calls

    def _group(self, key: _Key) -> _Group:
        return self._others[key] if isinstance(key, tuple) else self._groups[key]


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
