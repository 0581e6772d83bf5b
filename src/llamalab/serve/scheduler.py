"""Continuous batching: one thread owns the engine; the event loop talks to it through queues.

The engine is not thread-safe and a step blocks for tens of milliseconds, so it lives on
a dedicated thread. Between two steps that thread takes in what the event loop sent it
(new requests, cancellations), admits waiting requests into free batch rows with
``Engine.add`` (which only queues the prompt: the engine prefills it a chunk per step,
so a long prompt never stalls the streams already decoding), runs one ``Engine.step``,
and hands each event to the asyncio queue of the request it belongs to. Torch releases
the GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.

The thread must outlive anything a request can do: the engine ends a failed row with an
``"error"`` event and carries on, a request the engine refuses fails alone, and anything
else that goes wrong in an iteration is logged, fails the requests in flight (which of
them caused it cannot be told) and the loop goes on. A heartbeat lets ``/health`` tell a
dead or stuck thread from a busy one.

There is exactly one generation loop in llamalab, the engine's; this module only decides
*when* to call it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, wait
from typing import Any, Literal, TypeVar

from llamalab.errors import LlamalabError
from llamalab.generation import Engine, Generation, GenerationEvent, Request

log = logging.getLogger("llamalab.serve")

# While idle the thread wakes this often, only to show /health that it is alive.
IDLE_TICK_S = 1.0
# A step takes well under a second (prefill comes a chunk at a time); a heartbeat older
# than this means the thread is stuck, and /health says so.
DEFAULT_STALL_AFTER_S = 60.0


T = TypeVar("T")


def _log_death(loop: Future[None]) -> None:
    if not loop.cancelled() and loop.exception() is not None:
        log.error("the scheduler loop died", exc_info=loop.exception())


class Unavailable(Exception):
    """A request the server gave up on for its own reasons (it is shutting down)."""


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
        """This request's events in order, ending with the one that carries ``finish_reason``.

        Raises what the scheduler failed the request with: `LlamalabError` for a request
        the engine refused, `Unavailable` when the server gave up on it.
        """
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


Message = tuple[Literal["submit", "cancel"], Ticket] | tuple[Literal["abort"], str] | None


class EngineThread:
    """The one thread that does a server's torch work: loading, warming up, then stepping.

    Torch's CPU kernels run on OpenMP, which keeps a pool of worker threads for each
    thread that starts parallel work. With a second pool on a machine of few cores,
    libgomp counts more threads than CPUs and cuts its workers' spinning short, so every
    parallel region pays a sleep and a wake-up: a SmolLM2 decode step took 13.4 ms on a
    second thread against 5.6 ms on the thread that had loaded the model (2 cores).
    Handing every piece of torch work to this thread keeps one pool. Jobs run in order.
    """

    def __init__(self, name: str = "llamalab-engine") -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job``; its future holds what it returns or raises."""
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future

    def call(self, job: Callable[[], T]) -> T:
        """Run ``job`` on the thread and wait for it: its result, or its exception raised here."""
        return self.submit(job).result()

    def stop(self) -> None:
        """End the thread once the jobs queued before this have run."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # noqa: BLE001 (handed to whoever waits)
                    future.set_exception(exc)


class Scheduler:
    """Runs an `Engine` on its own thread and batches every submitted request through it.

    ``thread`` is the :class:`EngineThread` that loaded the engine, if one did (the
    ``serve`` command's); otherwise the scheduler starts one of its own.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        stall_after: float = DEFAULT_STALL_AFTER_S,
        thread: EngineThread | None = None,
    ) -> None:
        self.engine = engine
        self.stall_after = stall_after
        self._engine_thread = thread
        # Everything the event loop tells the thread goes through this one queue, so the
        # thread can sleep on it when idle and drain it without blocking between steps.
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._waiting: deque[Ticket] = deque()  # submitted, not yet admitted (FIFO)
        self._running: dict[Generation, Ticket] = {}  # admitted: prefilling or decoding
        self._loop_done: Future[None] | None = None  # the scheduler loop, once started
        # Each counter has one writer thread, so /health can read them without a lock.
        self.active_slots = 0  # written by the scheduler thread
        self._submitted = 0  # written by the event loop
        self._taken = 0  # written by the scheduler thread: admitted or ended while waiting
        self._ended = 0  # written by the scheduler thread: finished, failed or cancelled
        self._heartbeat = time.monotonic()  # written by the scheduler thread
        # Speculation's tokens over every ended request (/metrics): written by the thread.
        self.draft_tokens = 0  # drafted and verified
        self.accepted_draft_tokens = 0  # of those, the ones the model chose too

    @property
    def queued(self) -> int:
        """Requests submitted but not yet in a batch row."""
        return self._submitted - self._taken

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet ended (waiting or running)."""
        return self._submitted - self._ended

    @property
    def max_batch(self) -> int:
        """Batch rows, the most requests that generate at once."""
        return self.engine.max_batch

    def state(self) -> Literal["ok", "stalled", "dead"]:
        """Whether the thread runs ("ok"), hangs in one iteration ("stalled") or is gone."""
        if self._loop_done is None or self._loop_done.done():
            return "dead"
        if time.monotonic() - self._heartbeat > self.stall_after:
            return "stalled"
        return "ok"

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        """Start the thread (the app does it at startup)."""
        if self._loop_done is None:
            self._heartbeat = time.monotonic()
            if self._engine_thread is None:
                self._engine_thread = EngineThread("llamalab-scheduler")
            self._loop_done = self._engine_thread.submit(self._run)
            self._loop_done.add_done_callback(_log_death)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after its current step; unfinished requests fail with `Unavailable`."""
        if self._loop_done is not None:
            self._inbox.put(None)
            wait([self._loop_done], timeout)
            self._loop_done = None
            if self._engine_thread is not None:
                self._engine_thread.stop()
                self._engine_thread = None

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

    def abort(self, reason: str) -> None:
        """Fail every request in flight with `Unavailable(reason)`; the thread keeps running."""
        self._inbox.put(("abort", reason))

    # ------------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # However the thread ends (asked to, or killed by something no iteration can
            # catch), every request it holds, or that is still in the inbox, gets an
            # ending, so no client waits forever.
            self._fail_all(Unavailable("the server is shutting down"))
            while True:
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if message is not None and message[0] == "submit":
                    self._taken += 1
                    self._fail(message[1], Unavailable("the server is shutting down"))

    def _loop(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            try:
                # Sleep while there is nothing to do; otherwise only look at the inbox.
                if not self._take_messages(block=not self._running and not self._waiting):
                    return
                self._admit()
                if self._running:
                    self._step()
                self._publish_counts()
            except Exception:
                # A bug in this loop, not in one request (the engine isolates those). The
                # requests in flight may be what triggers it, so end them rather than
                # meet the same failure on every iteration; the server keeps serving.
                log.exception("scheduler iteration failed; ending the requests in flight")
                self._fail_all(Unavailable("internal error in the scheduler"))

    def _take_messages(self, *, block: bool) -> bool:
        """Apply every pending message; False once the server asked the thread to stop."""
        try:
            message = self._inbox.get(timeout=IDLE_TICK_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if message is None:
                return False
            if message[0] == "submit":
                self._waiting.append(message[1])
            elif message[0] == "cancel":
                self._cancel(message[1])
            else:
                self._fail_all(Unavailable(message[1]))
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        if ticket.generation is not None:
            self.engine.cancel(ticket.generation)
            self._running.pop(ticket.generation, None)
        else:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                return
            self._taken += 1
        self._end(ticket)

    def _admit(self) -> None:
        # Continuous batching: every free row takes the oldest waiting request, so a new
        # request joins the running batch at the next step instead of after it drains.
        while self._waiting and self.engine.free_rows:
            ticket = self._waiting.popleft()
            self._taken += 1
            try:
                generation = self.engine.add(ticket.request)
            except LlamalabError as exc:  # a request the engine refuses fails alone
                self._fail(ticket, exc)
                continue
            except Exception:
                log.exception("admitting a request failed")
                self._fail(ticket, Unavailable("internal error while admitting the request"))
                continue
            ticket.generation = generation
            self._running[generation] = ticket

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:
            # The engine ends failed rows itself; this is not expected. If it happens, fail
            # the requests in the batch but keep serving.
            log.exception("engine step failed")
            for generation, ticket in list(self._running.items()):
                self.engine.cancel(generation)
                self._fail(ticket, Unavailable("internal error during generation"))
            return
        pushes = []
        for generation, event in events:
            ticket = self._running.get(generation)
            if ticket is None:
                continue
            pushes.append((ticket, event))
            if event.finish_reason is not None:
                del self._running[generation]
                self._end(ticket)
        # The counts first: a client that hears its reply ended and asks /metrics or
        # /health next must not still see its row in use.
        self._publish_counts()
        for ticket, event in pushes:
            ticket._push(event)

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        if ticket.done:
            return
        if ticket.generation is not None:
            self._running.pop(ticket.generation, None)
        ticket._push(exc)
        self._end(ticket)

    def _fail_all(self, exc: BaseException) -> None:
        for generation in list(self._running):
            try:
                self.engine.cancel(generation)
            except Exception:  # freeing the row is best effort; the ticket fails regardless
                log.exception("cancelling a request failed")
        for ticket in [*self._waiting, *self._running.values()]:
            self._fail(ticket, exc)
        self._taken += len(self._waiting)
        self._waiting.clear()
        self._running.clear()

    def _end(self, ticket: Ticket) -> None:
        ticket.done = True
        self._ended += 1
        # A stand-in engine's generations may keep no timing.
        timing = getattr(ticket.generation, "timing", None)
        if timing is not None:
            # Accepted first: a scrape between the two sees a rate of at most 1.
            self.accepted_draft_tokens += timing.accepted_tokens
            self.draft_tokens += timing.draft_tokens

    def _publish_counts(self) -> None:
        self.active_slots = self.engine.max_batch - self.engine.free_rows
