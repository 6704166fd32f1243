"""The serving engine: one worker thread runs batched decode steps for every in-flight request.

HTTP handlers submit requests to a bounded queue (full -> QueueFull, which the app maps to 429) and
read events from a per-request asyncio queue. New requests join the running batch between decode
steps (continuous batching); a cancelled request (client gone) leaves it at the next step.
"""

from __future__ import annotations

import asyncio
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


@dataclasses.dataclass
class Event:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass
class Request:
    rid: int
    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    first_token: float | None = None


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
        self.alive = True
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self._requests)

    @property
    def queued(self) -> int:
        return self._pending.qsize()

    def submit(self, ids: list[int], params: SamplingParams) -> Request:
        req = Request(next(self._ids), ids, params, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self._pending.put_nowait(req)
        except queue.Full:
            self.metrics.requests.labels("rejected_queue_full").inc()
            raise QueueFull from None
        self.metrics.queued.set(self._pending.qsize())
        return req

    def cancel(self, req: Request) -> None:
        self._cancel.put(req.rid)

    def _emit(self, req: Request, ev: Event) -> None:
        req.loop.call_soon_threadsafe(req.events.put_nowait, ev)

    def _run(self) -> None:
        batch = DecodeBatch(self.backend, self.tok)
        while not self._stop.is_set():
            try:
                self._admit(batch)
                while not self._cancel.empty():
                    batch.cancel(self._cancel.get())
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
                    self.metrics.requests.labels(a.done).inc()
                    self._emit(req, Event(finish_reason=a.done, completion_tokens=len(a.tokens)))
                self.metrics.active.set(len(self._requests))
            except Exception as e:  # keep serving: fail the in-flight requests, reset the batch
                self.last_error = f"{type(e).__name__}: {e}"
                for req in self._requests.values():
                    self.metrics.requests.labels("error").inc()
                    self._emit(req, Event(error=self.last_error))
                self._requests.clear()
                batch = DecodeBatch(self.backend, self.tok)

    def _admit(self, batch: DecodeBatch) -> None:
        block = not len(batch)
        while len(batch) < self.max_batch:
            try:
                req = self._pending.get(timeout=0.05) if block else self._pending.get_nowait()
            except queue.Empty:
                return
            block = False
            self._requests[req.rid] = req
            batch.admit(req.rid, req.ids, req.params)
            self.metrics.prompt_tokens.inc(len(req.ids))
            self.metrics.queued.set(self._pending.qsize())

    def _on_text(self, rid: int, text: str) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        if req.first_token is None:
            req.first_token = time.monotonic()
            self.metrics.ttft.observe(req.first_token - req.submitted)
        self._emit(req, Event(text=text))
