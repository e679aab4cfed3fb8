"""Process pins: the models worker processes keep built between tasks (the process tier,
``trims_ray._process_tier``), as the node cache sees them.

A pin is a lease held by a worker process that keeps a model's read-only views after its task
has ended, so that its next task on that model costs no lease, no build and no actor call. Like
any lease it keeps the blob's bytes counted once and its shared object alive. Unlike a task's
lease it can be asked back: when the host tier needs the room or the model is evicted, the node
cache asks the pinning processes to give it back (``ask_back``); each process's reclaim thread,
waiting in ``wait_asked``, drops the model as soon as none of its own tasks uses it and releases
the pin. A pin of a process that died ends with the reaper, as every lease of a dead holder does.

Plain Python, no Ray. The node cache calls it under its own lock, except ``wait_asked``, which
waits on this object's condition alone (a reclaim thread must never hold the cache's lock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

from .._protocol import Holder
from .host_entry import HostEntry

__all__ = ["NodePins", "ProcessPins", "wait_until_gone"]

# The most accesses of one model one poll tells the policy of (``NodePins.note_hits``).
_MAX_ACCESSES_NOTED = 1000
# An ask handed out this long ago whose pin still holds is handed out again. The answer that
# carried it may never have reached its process (a poll's get gives up after the poll time plus
# 30 s while the call still runs); without a second ask that pin would last as long as its
# worker. Longer than that give-up, so that a poll in flight is not answered twice as a rule; an
# ask repeated anyway costs the process nothing (the model is already going).
ASK_AGAIN_AFTER_S = 45.0


class ProcessPins:
    """Which leases are pins, who holds them, and which the node cache has asked back."""

    def __init__(self, ask_again_after_s: float = ASK_AGAIN_AFTER_S, max_waiting: int | None = None) -> None:
        self.ask_again_after_s = ask_again_after_s
        # How many polls may wait in ``wait_asked`` at once (None: any number). The node cache's
        # actor has a fixed number of threads for them: a poll beyond that queued for a thread
        # until a wait ran out, so with many more processes than threads an ask reached some
        # of them only after several poll periods. Past this number a poll is answered at once
        # and its process asks again after its poll period.
        self.max_waiting = max_waiting
        self._waiting = 0
        self._pins: dict[str, tuple[object, HostEntry]] = {}  # lease id -> (holder, entry)
        self._asked: dict[object, set[str]] = {}  # holder -> ids of its pins asked back
        # Asks handed out whose pin has not ended yet: lease id -> (holder, when handed out).
        self._handed: dict[str, tuple[object, float]] = {}
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._pins)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._pins

    def add(self, lease_id: str, holder: object, entry: HostEntry) -> None:
        """Records a granted lease of ``holder`` on ``entry`` as a pin."""
        self._pins[lease_id] = (holder, entry)
        entry.pins += 1

    def discard(self, lease_id: object) -> None:
        """Forgets a pin that ended (released, or reaped); nothing for a lease that is not one."""
        pinned = self._pins.pop(lease_id, None)
        if pinned is None:
            return
        holder, entry = pinned
        entry.pins -= 1
        with self._cond:
            self._handed.pop(lease_id, None)
            asked = self._asked.get(holder)
            if asked is not None:
                asked.discard(lease_id)
                if not asked:
                    del self._asked[holder]

    def prune(self, held: Callable[[str], bool]) -> None:
        """Forgets the pins whose lease is no longer ``held`` (the reaper ended it)."""
        for lease_id in [i for i in self._pins if not held(i)]:
            self.discard(lease_id)

    def of(self, entry: HostEntry) -> list[str]:
        return [i for i, (_, e) in self._pins.items() if e is entry]

    def ask_back(self, entry: HostEntry) -> int:
        """Asks every process pinning ``entry`` to give it back; returns how many pins that is."""
        ids = self.of(entry)
        if ids:
            with self._cond:
                for lease_id in ids:
                    self._asked.setdefault(self._pins[lease_id][0], set()).add(lease_id)
                self._cond.notify_all()
        return len(ids)

    def wait_asked(self, holder: object, timeout_s: float) -> list[str]:
        """The ids of ``holder``'s pins asked back, waiting up to ``timeout_s`` for one; each is
        handed out once (the process releases it when its tasks are done with the model), and
        again when its pin still holds ``ask_again_after_s`` later. Returns [] at once, asked
        nothing, while ``max_waiting`` polls wait already."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._ask_again(holder)
            if not self._asked.get(holder):
                if self.max_waiting is not None and self._waiting >= self.max_waiting:
                    return []
                self._waiting += 1
                try:
                    while not self._asked.get(holder):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return []
                        self._cond.wait(left)
                finally:
                    self._waiting -= 1
            ids = self._asked.pop(holder)
            handed_at = time.monotonic()
            for lease_id in ids:
                self._handed[lease_id] = (holder, handed_at)
            return sorted(ids)

    def _ask_again(self, holder: object) -> None:
        """Puts back the asks handed out to ``holder`` long enough ago that their pins should
        have ended (under the condition's lock)."""
        before = time.monotonic() - self.ask_again_after_s
        again = [i for i, (h, at) in self._handed.items() if h == holder and at <= before]
        for lease_id in again:
            del self._handed[lease_id]
            self._asked.setdefault(holder, set()).add(lease_id)


def wait_until_gone(entries: Iterable[HostEntry], gone: Callable[[HostEntry], bool], timeout_s: float) -> bool:
    """Waits until every one of ``entries`` is ``gone``, for at most ``timeout_s``; returns
    whether they all went. ``gone`` takes the cache's lock itself. Polls from a fraction of a
    millisecond up to 5 ms apart: an idle process gives a model back within a millisecond or
    two, and a load waits on it (a fixed 5 ms poll cost most misses that evicted 5 ms)."""
    pending = list(entries)
    deadline = time.monotonic() + timeout_s
    pause = 0.0002
    while True:
        pending = [e for e in pending if not gone(e)]
        if not pending:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


class NodePins:
    """The node cache's calls for processes that keep models (a mixin of ``NodeCache``: it uses
    the cache's lock, host tier, lease table and ``pins``)."""

    def pin(self, key: str, holder: Holder, lease_id: str) -> bool:
        """Pins the blob ``key`` for a process that keeps it built (see ``pins``) under its own
        ``lease_id``; False when it is not ready in the tier's table (evicted, or never here)."""
        with self._lock:
            self._leases.check_new(lease_id)
            entry = self.host.entries.get(key)
            if entry is None or not entry.ready.is_set() or entry.evict_when_idle:
                return False
            lease_id, over = self._leases.add(entry, holder, lease_id)
            if over:
                return False
            entry.leases += 1
            self.pins.add(lease_id, holder, entry)
            self.on_change()
            return True

    def note_hits(self, hits: Mapping[str, int]) -> None:
        """Counts the hits processes served from the models they keep (``hits``: key -> count)
        as host hits, and tells the policy the models were used."""
        with self._lock:
            for key, count in hits.items():
                if key in self.host.entries and count > 0:
                    self.host.stats.hits += count
                    self.host.note_use(key, count)
                    # Each hit, as the policy would have seen it from a lease (frequency-based
                    # policies count them); bounded, so a flood cannot hold the lock long.
                    for _ in range(min(count, _MAX_ACCESSES_NOTED)):
                        self.host.policy.on_access(key)

    def wait_asked(self, holder: Holder, timeout_s: float) -> list[str]:
        """The pins of ``holder`` asked back (``ProcessPins.wait_asked``)."""
        return self.pins.wait_asked(holder, timeout_s)
