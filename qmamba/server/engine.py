"""The serving engine: one worker thread runs batched decode steps for every in-flight request.

HTTP handlers submit requests to a bounded queue (full -> QueueFull, which the app maps to 429) and
read events from a per-request asyncio queue. New requests join the running batch between decode
steps (continuous batching); a cancelled request (client gone) leaves it at the next step, or is dropped
unstarted if it is still queued. A request that fails to start (its prefill raises) fails alone. `stop` ends
every request still open with an error event (status 503), so no client waits on a stopped engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import queue
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qmamba.runtime.backends import Backend
from qmamba.runtime.generate import DecodeBatch, SamplingParams
from qmamba.runtime.tokenizer import Tokenizer


class QueueFull(Exception):
    """The request queue is at capacity."""


class Unavailable(Exception):
    """The engine takes no new requests: it is shutting down, or its worker thread is gone."""


SHUTDOWN_MESSAGE = "the server is shutting down"


@dataclasses.dataclass
class Event:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # the HTTP status for an error event


@dataclasses.dataclass
class Request:
    rid: int
    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token: float | None = None
    cancelled: bool = False  # the client left (set by the server's thread)
    done: bool = False  # the last event was sent (set by the engine)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qmamba_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("qmamba_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("qmamba_completion_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("qmamba_request_latency_seconds", "Submit to last token", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("qmamba_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.step = Histogram("qmamba_decode_step_seconds", "One batched decode step", registry=r,
                              buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.batch = Histogram("qmamba_decode_batch_size", "Requests per decode step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.active = Gauge("qmamba_active_requests", "Requests in the decode batch", registry=r)
        self.queued = Gauge("qmamba_queued_requests", "Requests waiting to join the batch", registry=r)


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, max_queue: int = 64, max_batch: int = 32) -> None:
        # max_batch 0 would never admit a request (each would wait forever); max_queue 0 is an unbounded queue.Queue
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.backend = backend
        self.tok = tokenizer
        self.max_batch = max_batch
        self.metrics = Metrics()
        self._pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._cancel: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qmamba-engine", daemon=True)
        self._started = False
        self._accepting = True
        self.last_error: str | None = None

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new requests (Unavailable); those already submitted go on."""
        self._accepting = False

    def stop(self, reason: str = SHUTDOWN_MESSAGE) -> None:
        """Stop the worker after its current step and end every request still open with an error event.

        Idempotent; safe before start. Without this a client of a stopped engine would wait forever, and a
        worker thread left inside a backend call at interpreter exit can abort the process."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # stuck in a backend call: leave its requests to it
                return
        for req in list(self._requests.values()):
            self._finish(req, Event(error=reason, status=503), "shutdown")
        self._requests.clear()
        while True:
            try:
                req = self._pending.get_nowait()
            except queue.Empty:
                break
            self._finish(req, Event(error=reason, status=503), "shutdown")
        self.metrics.active.set(0)
        self.metrics.queued.set(0)

    @property
    def alive(self) -> bool:
        """The worker thread runs (False before start, after stop, or if it died)."""
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def accepting(self) -> bool:
        return self._accepting and (not self._started or self._thread.is_alive())

    @property
    def active(self) -> int:
        return len(self._requests)

    @property
    def queued(self) -> int:
        return self._pending.qsize()

    @property
    def idle(self) -> bool:
        return not self._requests and self._pending.empty()

    def submit(self, ids: list[int], params: SamplingParams) -> Request:
        if not self.accepting:
            self.metrics.requests.labels("rejected_unavailable").inc()
            raise Unavailable(SHUTDOWN_MESSAGE if not self._accepting else "the engine's worker thread is gone")
        req = Request(next(self._ids), ids, params, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self._pending.put_nowait(req)
        except queue.Full:
            self.metrics.requests.labels("rejected_queue_full").inc()
            raise QueueFull from None
        self.metrics.queued.set(self._pending.qsize())
        return req

    def cancel(self, req: Request) -> None:
        """The client left: drop the request (queued: unstarted; running: at the next step). A no-op when done."""
        req.cancelled = True
        if not req.done:
            self._cancel.put(req.rid)

    def _emit(self, req: Request, ev: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting any more
            req.loop.call_soon_threadsafe(req.events.put_nowait, ev)

    def _finish(self, req: Request, ev: Event, outcome: str) -> None:
        req.done = True
        self.metrics.requests.labels(outcome).inc()
        self._emit(req, ev)

    def _run(self) -> None:
        batch = DecodeBatch(self.backend, self.tok)
        while not self._stop.is_set():
            try:
                self._admit(batch)
                while True:
                    try:
                        rid = self._cancel.get_nowait()
                    except queue.Empty:
                        break
                    if rid in self._requests:  # others are finished (or dropped unstarted in _admit)
                        batch.cancel(rid)
                if not len(batch):
                    continue
                t0 = time.perf_counter()
                n = len(batch)
                finished = batch.step(self._on_text)
                self.metrics.step.observe(time.perf_counter() - t0)
                self.metrics.batch.observe(n)
                for a in finished:
                    req = self._requests.pop(a.idx)
                    now = time.monotonic()
                    self.metrics.latency.observe(now - req.submitted)
                    self.metrics.completion_tokens.inc(len(a.tokens))
                    self._finish(req, Event(finish_reason=a.done, completion_tokens=len(a.tokens)), a.done)
                self.metrics.active.set(len(self._requests))
            except Exception as e:  # keep serving: fail the in-flight requests, reset the batch
                self.last_error = f"{type(e).__name__}: {e}"
                for req in self._requests.values():
                    self._finish(req, Event(error=self.last_error), "error")
                self._requests.clear()
                self.metrics.active.set(0)
                batch = DecodeBatch(self.backend, self.tok)

    def _admit(self, batch: DecodeBatch) -> None:
        block = not len(batch)
        while len(batch) < self.max_batch and not self._stop.is_set():
            try:
                req = self._pending.get(timeout=0.05) if block else self._pending.get_nowait()
            except queue.Empty:
                return
            block = False
            self.metrics.queued.set(self._pending.qsize())
            if req.cancelled:  # its client left while it waited: no prefill for nobody
                self._finish(req, Event(finish_reason="cancelled"), "cancelled")
                continue
            try:
                batch.admit(req.rid, req.ids, req.params)  # leaves the batch as it was if it raises
            except Exception as e:  # this request fails alone; the batch goes on
                self.last_error = f"{type(e).__name__}: {e}"
                self._finish(req, Event(error=self.last_error), "error")
                continue
            self._requests[req.rid] = req
            self.metrics.prompt_tokens.inc(len(req.ids))
            self.metrics.active.set(len(self._requests))

    def _on_text(self, rid: int, text: str) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        if req.first_token is None:
            req.first_token = time.monotonic()
            self.metrics.ttft.observe(req.first_token - req.submitted)
        self._emit(req, Event(text=text))
