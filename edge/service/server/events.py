"""The event stream's fan-out: one broadcaster thread follows the store's event log and hands each new
event to every WatchEvents subscriber's bounded queue.

A subscriber that falls behind by more than its buffer is dropped (marked overflowed), never slowing the
pipeline or the other subscribers; its stream ends with RESOURCE_EXHAUSTED and the client resumes from
the store. Knows nothing of protobuf: the servicer converts what it takes from a subscriber's queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from edge.errors import StoreError
from edge.service.store import Event, Store

__all__ = ["POLL_S", "REPLAY_PAGE", "STALLED_CANCEL_S", "EventBroadcaster", "Subscriber"]

log = logging.getLogger(__name__)

REPLAY_PAGE = 500  # events read from the store per query while a subscriber catches up
POLL_S = 0.25  # how often blocked stream loops look at cancellation, overflow and shutdown
STALLED_CANCEL_S = 30.0  # an overflowed subscriber that reads nothing for this long is cancelled


class Subscriber:
    """One WatchEvents stream's mailbox: the broadcaster puts, the stream's thread gets."""

    def __init__(self, buffer: int, after: int, context: grpc.ServicerContext) -> None:
        self.queue: queue.Queue[Event] = queue.Queue(maxsize=buffer)
        self.last_sent = after  # the sequence of the last event handed to grpc
        self.overflowed = threading.Event()
        self.overflowed_at = 0.0
        self.context = context  # the grpc ServicerContext; cancelled when it stalls after overflowing


class EventBroadcaster:
    """Follows the store's event log in one thread and hands every new event to each subscriber.

    A subscriber's queue holds at most `buffer` events; when it is full the subscriber is dropped
    (marked overflowed) instead of anyone waiting for it. `register` admits a subscriber only once it
    has replayed from the store everything already dispatched, so nothing falls between replay and live.
    """

    def __init__(self, store: Store, *, on_tick: Callable[[], None] | None = None, poll_s: float = POLL_S) -> None:
        self._store = store
        self._on_tick = on_tick
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()
        self._overflowed: list[Subscriber] = []
        self._dispatched = store.last_sequence()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-grpc-events", daemon=True)

    @property
    def dispatched(self) -> int:
        """The sequence of the newest event handed to subscribers."""
        with self._lock:
            return self._dispatched

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def register(self, subscriber: Subscriber, replayed_through: int) -> bool:
        """Add `subscriber` if it has seen every dispatched event (True); else it must replay more first."""
        with self._lock:
            if replayed_through < self._dispatched:
                return False
            self._subscribers.add(subscriber)
            return True

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._on_tick is not None:
                    self._on_tick()
                if self._store.wait_for_events(self.dispatched, timeout=self._poll_s):
                    self._dispatch(self._store.events_after(self.dispatched, limit=REPLAY_PAGE))
                self._cancel_stalled()
            except StoreError as exc:  # the store was closed under us (shutdown): nothing more to send
                if not self._stop.is_set():
                    log.warning("event broadcaster stops: %s", exc)
                return
            except Exception:  # a bug must not end every subscriber's stream silently
                log.exception("event broadcaster failed; retrying in %.1f s", self._poll_s)
                self._stop.wait(self._poll_s)

    def _dispatch(self, events: Sequence[Event]) -> None:
        with self._lock:
            for event in events:
                for sub in list(self._subscribers):
                    try:
                        sub.queue.put_nowait(event)
                    except queue.Full:
                        self._subscribers.discard(sub)
                        sub.overflowed_at = time.monotonic()
                        sub.overflowed.set()
                        self._overflowed.append(sub)
                self._dispatched = event.sequence

    def _cancel_stalled(self) -> None:
        """A subscriber that overflowed while its client read nothing sits blocked in a send; free it."""
        with self._lock:
            stalled = [s for s in self._overflowed if time.monotonic() - s.overflowed_at > STALLED_CANCEL_S]
            self._overflowed = [s for s in self._overflowed if s not in stalled]
        for sub in stalled:
            if sub.context.is_active():
                log.info("cancelling a WatchEvents stream whose client has read nothing for %.0f s", STALLED_CANCEL_S)
                sub.context.cancel()

    def forget(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)
            if subscriber in self._overflowed:
                self._overflowed.remove(subscriber)

