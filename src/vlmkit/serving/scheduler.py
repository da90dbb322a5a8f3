"""Iteration-level batching: one thread owns the model and decodes every active request together.

Requests wait in a bounded queue; at every decoding step the scheduler admits waiting requests into the running
batch (prefilled together, merged into the KV cache), drops cancelled ones, and hands each request its text
pieces. A new request therefore joins without waiting for the running ones to finish.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlmkit.backends import Backend, RunningBatch
from vlmkit.errors import VlmkitError
from vlmkit.inference.options import GenerationOptions
from vlmkit.inference.rows import StreamEvent

log = logging.getLogger(__name__)


class QueueFull(VlmkitError):
    """The waiting queue is full; retry later."""


class ShuttingDown(VlmkitError):
    """The scheduler no longer accepts requests."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its prompt, options and where its events go (all ``options.n`` answers')."""

    encoded: Any
    """The backend's encoded prompt (:meth:`Backend.encode`)."""
    options: GenerationOptions
    deliver: Callable[[StreamEvent | BaseException], None]
    key: int = field(default_factory=itertools.count().__next__)
    remaining: int = 0
    """Answers not finished yet (set to ``options.n`` when submitted)."""


class Scheduler:
    """Runs a backend's running batch (:class:`~vlmkit.backends.RunningBatch`) in a background thread."""

    def __init__(self, engine: Backend, max_batch: int = 32, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Ticket] = deque()
        self._active: dict[int, Ticket] = {}
        self._cancelled: set[int] = set()
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="vlmkit-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> tuple[int, int]:
        """(active rows, waiting requests)."""
        with self._cond:
            return len(self._active), len(self._waiting)

    def submit(self, ticket: Ticket) -> Ticket:
        """Queue a request; raises :class:`QueueFull` when ``max_queue`` requests are already waiting."""
        ticket.remaining = ticket.options.n
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (limit {self.max_queue})")
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Forget a request (client gone): its row leaves the batch at the next step."""
        with self._cond:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            elif ticket.key in self._active:
                self._cancelled.add(ticket.key)
            self._cond.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish everything queued or running, then stop the thread. True if it finished."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _admit(self, batch: RunningBatch) -> None:
        with self._cond:
            while not self._waiting and not batch and not self._cancelled and not self._stop:
                self._cond.wait()
            room = self.max_batch - len(batch)
            admitted: list[Ticket] = []
            # a request takes one row per answer (n); one too big for the room still runs alone
            while self._waiting and (self._waiting[0].options.n <= room or not (admitted or batch)):
                admitted.append(self._waiting.popleft())
                room -= admitted[-1].options.n
            cancelled, self._cancelled = self._cancelled, set()
            for ticket in admitted:
                self._active[ticket.key] = ticket
        if cancelled:
            batch.cancel(cancelled)
            with self._cond:
                for key in cancelled:
                    self._active.pop(key, None)
        if admitted:
            try:
                self._deliver(batch.add([(t.key, t.encoded, t.options) for t in admitted]))
            except Exception as exc:  # a failed prefill fails those requests, not the server
                log.exception("prefill failed")
                self._finish([t.key for t in admitted], exc)

    def _deliver(self, events: list[StreamEvent]) -> None:
        for event in events:
            ticket = self._active.get(event.index)  # type: ignore[call-overload]
            if ticket is None:
                continue
            if event.error is not None:  # this request failed on its own; the batch goes on
                ticket.deliver(event.error)
                self._finish([ticket.key])
                with self._cond:  # its other answers (n > 1) leave the batch at the next step
                    self._cancelled.add(ticket.key)
                continue
            ticket.deliver(event)
            if event.result is not None:
                ticket.remaining -= 1
                if ticket.remaining <= 0:
                    self._finish([ticket.key])

    def _finish(self, keys: list[int], error: BaseException | None = None) -> None:
        with self._cond:
            tickets = [self._active.pop(k) for k in keys if k in self._active]
        if error is not None:
            for ticket in tickets:
                ticket.deliver(error)

    def _loop(self) -> None:
        batch = self.engine.new_batch()
        while True:
            self._admit(batch)
            with self._cond:
                if self._stop and not batch and not self._waiting:
                    return
            if not batch:
                continue
            try:
                events = batch.step()
            except Exception as exc:  # keep serving: fail the running requests, start a fresh batch
                log.exception("decoding step failed")
                self._finish(list(batch.keys), exc)  # type: ignore[arg-type]
                batch = self.engine.new_batch()
                continue
            self._deliver(events)
