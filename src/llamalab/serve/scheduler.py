"""Continuous batching: one thread owns the engine; the event loop talks to it through queues.

The engine is not thread-safe and a decode step blocks for tens of milliseconds, so it
lives on a dedicated thread. Between two decode steps that thread takes in what the
event loop sent it (new requests, cancellations), admits waiting requests into free
batch rows, runs one ``Engine.step`` for every running row, and hands each event to the
asyncio queue of the request it belongs to. Torch releases the GIL inside its kernels,
so the event loop keeps serving HTTP while a step runs.

There is exactly one generation loop in llamalab, the engine's; this module only decides
*when* to call it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator

from llamalab.generation import Engine, Generation, GenerationEvent, Request

log = logging.getLogger("llamalab.serve")


class Ticket:
    """One request's seat in the scheduler: its events arrive on an asyncio queue.

    Created on the event loop by `Scheduler.submit`; the scheduler thread fills
    ``_events`` with `GenerationEvent`s (the last one has a ``finish_reason``) or with
    one exception if the request could not run.
    """

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        self.generation: Generation | None = None  # set by the scheduler thread on admission
        self.done = False  # finished, failed or cancelled

    def _push(self, item: GenerationEvent | BaseException) -> None:
        """Called on the scheduler thread: wake the reader on the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """This request's events in order, ending with the one that carries ``finish_reason``."""
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class Scheduler:
    """Runs an `Engine` on its own thread and batches every submitted request through it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Everything the event loop tells the thread goes through this one queue, so the
        # thread can sleep on it when idle and drain it without blocking between steps.
        self._inbox: queue.SimpleQueue[tuple[str, Ticket] | None] = queue.SimpleQueue()
        self._waiting: deque[Ticket] = deque()  # submitted, not yet admitted (FIFO)
        self._running: dict[Generation, Ticket] = {}
        self._thread: threading.Thread | None = None
        # Each counter has one writer thread, so /health can read them without a lock.
        self.active_slots = 0  # written by the scheduler thread
        self._submitted = 0  # written by the event loop
        self._taken = 0  # written by the scheduler thread: admitted or cancelled while waiting

    @property
    def queued(self) -> int:
        """Requests submitted but not yet in a batch row."""
        return self._submitted - self._taken

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="llamalab-scheduler", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; unfinished requests are cancelled."""
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> Ticket:
        """Queue a request; call from the event loop. Read its events with ``Ticket.events()``."""
        ticket = Ticket(request, asyncio.get_running_loop())
        self._submitted += 1
        self._inbox.put(("submit", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Give up on a request (its client went away): its row is freed before the next step."""
        if not ticket.done:
            self._inbox.put(("cancel", ticket))

    # ------------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        while True:
            # Sleep while there is nothing to decode; otherwise only look at the inbox.
            if not self._take_messages(block=not self._running and not self._waiting):
                break
            self._admit()
            if self._running:
                self._step()
            self._publish_counts()
        for ticket in [*self._waiting, *self._running.values()]:
            self._fail(ticket, RuntimeError("the server is shutting down"))

    def _take_messages(self, *, block: bool) -> bool:
        """Apply every pending message; False once the server asked the thread to stop."""
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if message is None:
                return False
            kind, ticket = message
            if kind == "submit":
                self._waiting.append(ticket)
            else:
                self._cancel(ticket)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket.generation is not None:
            self.engine.cancel(ticket.generation)
            self._running.pop(ticket.generation, None)
        else:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                pass
            else:
                self._taken += 1

    def _admit(self) -> None:
        # Continuous batching: every free row takes the oldest waiting request, so a new
        # request joins the running batch at the next step instead of after it drains.
        while self._waiting and self.engine.free_rows:
            ticket = self._waiting.popleft()
            self._taken += 1
            try:
                generation, event = self.engine.submit(ticket.request)
            # A prompt that does not fit, or a bug: fail this request only, never the thread.
            except Exception as exc:  # noqa: BLE001
                self._fail(ticket, exc)
                continue
            ticket.generation = generation
            if generation.finished:
                ticket.done = True
            else:
                self._running[generation] = ticket
            ticket._push(event)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:
            # Not expected; if it happens, fail the requests in the batch but keep serving.
            log.exception("decode step failed")
            for generation, ticket in list(self._running.items()):
                self.engine.cancel(generation)
                self._fail(ticket, exc)
            return
        for generation, event in events:
            ticket = self._running.get(generation)
            if ticket is None:
                continue
            if generation.finished:
                del self._running[generation]
                ticket.done = True
            ticket._push(event)

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        if ticket.generation is not None:
            self._running.pop(ticket.generation, None)
        ticket.done = True
        ticket._push(exc)

    def _publish_counts(self) -> None:
        self.active_slots = self.engine.max_batch - self.engine.free_rows
