"""The process tier: models a worker process keeps built between its tasks.

Ray reuses worker processes, so the module a decorated task built from the node's shared copy
(read-only views of it, no byte copied) can serve the next task of that model in the same
process as it is: no lease, no actor call, no build. A warm hit then costs what a plain Ray task
costs. Each model kept holds a pin on the node's cache (``cache.pins``): the node counts its
bytes once, never frees the copy while a process maps it, and can ask for it back. A reclaim
thread per process long-polls the node's cache for that (``NodeCacheActor.reclaims``), carrying
the hits served here since its last poll, and drops a model asked back as soon as no task of this
process uses it. The pins of a process that dies end with the node's lease reaper.

A kept model is one object for every task of its tenant in this process, as a model loaded once
in a Ray Serve replica is: its weights are read-only, but Python state a task changes on it
(attributes, hooks) is seen by that tenant's next task here. Tenants never share one object.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from ._gc import freeze_startup_objects
from ._protect import ProtectToken, protect_array, release
from ._protocol import Holder, HostGrant, Resolved, cache_key
from .actors._naming import forget_node_cache_actor
from ._raycalls import get, wait_in_task
from ._store import materialize

__all__ = ["PROCESS", "Kept", "ProcessTier", "process_tier"]

log = logging.getLogger("trims_ray")

# The tier a task served from this process's own kept model reports (``_lease.served_tier``).
PROCESS = "process"
# Models one process keeps at most: the least recently used one goes first. A kept model costs
# the process only its module's Python objects (the weights are the node's shared copy), but
# each pins a copy the node cannot free without asking.
KEEP_AT_MOST = 8
# How long one long poll waits for a request to give back; also how often the hits served here
# reach the node's cache (its policy and its hit counters).
POLL_S = 1.0
# Pins asked back before this process kept their model remembered at most (``keep`` gives such
# a model back at once); the oldest are forgotten first.
EARLY_ASKS_AT_MOST = 256


@dataclass(eq=False)
class Kept:
    """A model this process keeps: the module (or state dict) and what keeps it valid."""

    tenant: str
    key: str  # the blob's cache key
    fingerprint: str  # the registration it was built from (the manifest's fingerprint)
    model: Any
    view: np.ndarray  # the blob in the node's shared object: holding it keeps it mapped
    token: ProtectToken  # its pages are read-only while kept
    pin_id: str  # the lease on the node's cache that counts it
    actor: Any  # that cache's actor
    incarnation: str  # and which start of it (a restarted actor keeps its Ray id)
    users: int = 0  # tasks of this process using it now
    doomed: bool = False  # asked back (or its pin refused): no new task gets it
    confirm: ray.ObjectRef | None = None  # the answer to a pin sent after the grant, until read


class ProcessTier:
    """The models this process keeps (one per process: ``process_tier()``)."""

    def __init__(self, keep_at_most: int = KEEP_AT_MOST, poll_s: float = POLL_S) -> None:
        self.keep_at_most = keep_at_most
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[str, str], Kept] = OrderedDict()  # (tenant, fingerprint)
        self._hits: dict[str, int] = {}  # cache key -> hits since the last poll
        self._ids = itertools.count(1)
        # Pin ids in the form of a caller's lease ids (``LeaseTable``): 32 hex digits, a colon.
        self._prefix = uuid.uuid4().hex
        self._holder: Holder | None = None
        self._actor: Any = None  # the node cache actor the kept models' pins are on
        self._incarnation = ""  # its incarnation, as the last poll answered
        self._thread: threading.Thread | None = None
        # Set by ``keep`` when it keeps a model from another cache, or another start of it,
        # than the last poll answered: the reclaim thread, waiting out a failed poll of the
        # cache that died, polls the new one at once. It used to sleep on: an evict right after
        # a cache restarted waited that long (0.5 s measured) for a model it asked back, or
        # gave up (a CI run on a busy machine, past the 2 s wait).
        self._cache_changed = threading.Event()
        # Set by ``keep``: the reclaim thread, which waits on it while this process keeps no
        # model and has no hits to report, polls again. A worker that once kept a model used to
        # poll its node's cache every ``poll_s`` for good, whatever it kept since.
        self._kept_one = threading.Event()
        self._asleep = False  # the reclaim thread waits for ``_kept_one`` (``polling``)
        # Pins the node asked back before ``keep`` had recorded them: a pin granted with its
        # lease is asked back at once when the node is over its budget, and the ask may reach
        # this process's poll while the task is still building the model. Handed out once, it
        # would otherwise be lost, and the model kept against the node's budget for good.
        self._asked_early: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)

    @property
    def polling(self) -> bool:
        """Whether the reclaim thread polls the node's cache now: False before this process
        keeps a model, and while it keeps none and has told the node every hit it served."""
        with self._lock:
            return self._thread is not None and not self._asleep

    def take(self, tenant: str, hint: Resolved, count: bool = True) -> Kept | None:
        """The model kept for ``tenant`` and the registration ``hint`` names, marked in use by
        the calling task (hand it back with ``give``), or None. ``count``: report it as a hit
        (not when the task's caller leased at submit: the node counted that lease's hit)."""
        with self._lock:
            kept = self._kept.get((tenant, hint.fingerprint))
            if kept is None or kept.doomed:
                return None
            kept.users += 1
            self._kept.move_to_end((tenant, kept.fingerprint))
            if count:
                self._hits[kept.key] = self._hits.get(kept.key, 0) + 1
            return kept

    def give(self, kept: Kept) -> None:
        """The calling task is done with ``kept``; it goes now if it was asked back meanwhile,
        or if its pin, asked for after its grant, was refused (the node let the copy go)."""
        try:
            confirm = kept.confirm
            if confirm is not None:
                try:  # sent when the task started: answered by now, as a rule. Off the main
                    # thread: a get there would hand the task's CPU back and let Ray start a worker.
                    pinned = wait_in_task(_get_briefly, confirm) == kept.incarnation  # "": refused
                except Exception:
                    pinned = False
                with self._lock:
                    kept.confirm = None
                    if not pinned:
                        self._doom(kept)
        finally:  # also when the task is cancelled in that wait: else the model is never dropped
            with self._lock:
                kept.users -= 1
                going = kept.doomed and kept.users == 0
            if going:
                self._drop(kept)

    def new_pin_id(self) -> str:
        return f"{self._prefix}:{next(self._ids)}"

    def keep(
        self, tenant: str, grant: HostGrant, obj: np.ndarray, actor: Any, pin_id: str, holder: Holder,
        confirm: ray.ObjectRef | None = None,
    ) -> Kept:
        """Builds the model of ``grant`` from its object ``obj`` (read-only from now on) and keeps
        it under the pin ``pin_id`` on ``actor``, in use by the calling task (``give`` it back).
        ``confirm``: the answer to the pin when it was asked for after the grant (``pin``); a
        refusal drops the model. Raises as ``materialize`` (then nothing is kept, the pin is
        released)."""
        manifest = grant.manifest
        blob = obj[grant.offset : grant.offset + manifest.nbytes]
        token = None
        try:
            token = protect_array(blob)
            model = materialize(manifest, blob)
        except BaseException:
            if token is not None:
                release(token)
            _release_pin(actor, pin_id)
            raise
        kept = Kept(
            tenant, cache_key(manifest), manifest.fingerprint, model, blob, token, pin_id, actor, grant.incarnation, 1
        )
        kept.confirm = confirm
        going: list[Kept] = []
        with self._lock:
            if self._actor is not None and _actor_id(self._actor) != _actor_id(actor):
                # The node's cache was replaced: its pins died with it.
                going += self._doom_where(lambda _: True)
                self._incarnation = ""
            self._actor, self._holder = actor, holder
            if grant.incarnation != self._incarnation:
                self._cache_changed.set()
            old = self._kept.pop((tenant, kept.fingerprint), None)
            if old is not None:  # two tasks of one process built it at once: the older goes
                going += self._doom(old)
            self._kept[(tenant, kept.fingerprint)] = kept
            if pin_id in self._asked_early:  # asked back already: it goes when this task is done
                del self._asked_early[pin_id]
                going += self._doom(kept)
            while len(self._kept) > self.keep_at_most:
                _, oldest = self._kept.popitem(last=False)
                going += self._doom(oldest)
            self._kept_one.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll_forever, name="trims-process-tier", daemon=True)
                self._thread.start()
        for old in going:
            self._drop(old)
        return kept

    def _drop_from(self, actor: Any, unless: str | None = None) -> None:
        """Drops the models kept under pins on ``actor``, but those of its incarnation
        ``unless`` (those in use go when their task ends)."""
        self._drop_where(lambda kept: _actor_id(kept.actor) == _actor_id(actor) and kept.incarnation != unless)

    def drop_all(self) -> int:
        """Drops every kept model no task uses now (the others go when their task ends)."""
        return self._drop_where(lambda _: True)

    # -- the reclaim thread --------------------------------------------------------------------

    def _poll_forever(self) -> None:
        while True:
            self._sleep_while_idle()
            try:
                self._poll_once()
            except Exception as exc:  # the thread must go on: without it nothing is given back
                log.warning("trims_ray: the process tier's reclaim thread failed a round: %r", exc)
                self._pause()

    def _poll_once(self) -> None:
        """One long poll of the node's cache, and what its answer asks."""
        with self._lock:
            hits, self._hits = self._hits, {}
            actor, holder, heard = self._actor, self._holder, self._incarnation
        started = time.monotonic()
        try:
            # No retries: a poll that met its actor dying is answered by the next one, not replayed.
            incarnation, asked = get(
                actor.reclaims.options(max_task_retries=0).remote(holder, hits, self.poll_s, heard),
                timeout=self.poll_s + 30,
            )
        except ray.exceptions.RayActorError:
            # The node's cache died (a restart keeps its actor id), and its objects and pins
            # with it: nothing kept from it here is counted any more. The next task leases
            # from its replacement; this thread polls whichever cache that is. Ray's
            # ActorUnavailableError ("temporarily unavailable") lands here too, and is not
            # waited out: Ray raises it while the actor restarts or its process cannot be
            # reached, and a start that died took its objects with it, whose memory the object
            # store may already hand to others. A cache that was only unreachable costs a reload.
            log.info("trims_ray: the node cache died; dropping the models this process kept")
            forget_node_cache_actor()
            self._drop_from(actor)
            self._pause()
            return
        except Exception as exc:  # a slow or unreachable cache: ask again
            log.debug("trims_ray: reclaim poll failed: %s", exc)
            self._pause()
            return
        with self._lock:
            if _actor_id(self._actor) == _actor_id(actor):
                self._incarnation = incarnation
        # Models kept from an earlier start of this cache (it restarted: a call queued for
        # it while it did fails nothing) are no longer counted, nor their objects owned.
        self._drop_from(actor, unless=incarnation)
        given_back = set(asked)
        with self._lock:
            known = {kept.pin_id for kept in self._kept.values()}
            for pin_id in given_back - known:  # not kept yet (see ``_asked_early``)
                self._asked_early[pin_id] = None
                if len(self._asked_early) > EARLY_ASKS_AT_MOST:
                    self._asked_early.popitem(last=False)
        self._drop_where(lambda kept: kept.pin_id in given_back)
        if not asked and incarnation == heard and time.monotonic() - started < self.poll_s / 2:
            # Answered at once with nothing: as many polls as the node lets wait were waiting
            # (``ProcessPins.max_waiting``). Polling again at once would spin.
            self._pause()

    def _sleep_while_idle(self) -> None:
        """Waits for ``keep`` while this process keeps no model and has no hits to report: no
        ask can be for it, and a dead cache's process need not poll on."""
        self._kept_one.clear()  # before the check: a keep after it wakes the wait below
        with self._lock:
            self._asleep = not self._kept and not self._hits
        if self._asleep:
            self._kept_one.wait()
            with self._lock:
                self._asleep = False

    def _pause(self) -> None:
        """Waits ``poll_s`` before polling again after a failed poll, or until ``keep`` keeps a
        model from another cache (the next poll goes to that one)."""
        if self._cache_changed.wait(self.poll_s):
            self._cache_changed.clear()

    # -- under the lock: doom; outside it: drop ------------------------------------------------

    def _doom(self, kept: Kept) -> list[Kept]:
        """Takes ``kept`` out of the table; returns it if no task uses it (drop it now), else
        [] (the last task's ``give`` drops it)."""
        kept.doomed = True
        if self._kept.get((kept.tenant, kept.fingerprint)) is kept:
            del self._kept[(kept.tenant, kept.fingerprint)]
        return [] if kept.users else [kept]

    def _doom_where(self, which: Callable[[Kept], bool]) -> list[Kept]:
        """``_doom`` for every kept model ``which`` selects; returns those to drop now."""
        going = []
        for kept in [k for k in self._kept.values() if which(k)]:
            going += self._doom(kept)
        return going

    def _drop_where(self, which: Callable[[Kept], bool]) -> int:
        """Dooms the kept models ``which`` selects and drops those no task uses (the others go
        when their task ends); returns how many were dropped now."""
        with self._lock:
            going = self._doom_where(which)
        for kept in going:
            self._drop(kept)
        return len(going)

    def _drop(self, kept: Kept) -> None:
        # Pages writable again before the mapping can go (plasma may reuse the memory for an
        # object this process writes), then the pin, so the node frees the copy after we let go.
        try:
            release(kept.token)
        except OSError as exc:  # the pages could not be made writable: say so, let the pin go
            log.warning("trims_ray: unprotecting a dropped model failed: %s", exc)
        kept.model = kept.view = None
        _release_pin(kept.actor, kept.pin_id)


def _get_briefly(ref: ray.ObjectRef) -> Any:
    return get(ref, timeout=10)


def _actor_id(actor: Any) -> object:
    return getattr(actor, "_actor_id", actor)


def _release_pin(actor: Any, pin_id: str) -> None:
    with contextlib.suppress(Exception):  # a dead cache holds no pin
        actor.release.remote(pin_id)


_tier: ProcessTier | None = None
_tier_lock = threading.Lock()


def process_tier() -> ProcessTier:
    """This process's tier (made on first use)."""
    global _tier
    if _tier is None:
        with _tier_lock:
            if _tier is None:
                _tier = ProcessTier()
                # A worker that keeps models lives on: what it holds by now (its imports, torch)
                # need not be walked by every node-wide gc.collect of Ray's (``_gc``).
                freeze_startup_objects()
    return _tier
