"""The HTTP server, live on 127.0.0.1 with a real HTTP client: validation, streaming, batching,
disconnects, queue limits; the server must stay healthy after each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest

for _mod in ("fastapi", "uvicorn", "httpx"):  # a skip with the reason, not a collection error
    pytest.importorskip(_mod, reason=f"{_mod} is not installed: the server extra is needed for these tests")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from qmamba.runtime import ByteTokenizer, Generator, SamplingParams, load_backend  # noqa: E402
from qmamba.server.app import create_app  # noqa: E402
from qmamba.server.engine import Engine  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def live_server(tiny_model_dir, backend=None, max_tokens_limit: int = 64, **engine_kw):
    """A server on a free port in this process (its engine included), for as long as the block runs."""
    backend = backend or load_backend("torch", tiny_model_dir)
    engine = Engine(backend, ByteTokenizer(), **engine_kw)
    app = create_app(engine, "qmamba-tiny", max_prompt_tokens=200, max_tokens_limit=max_tokens_limit)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    until(lambda: server.started, 30, "the server to start")
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        th.join(timeout=15)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with live_server(tiny_model_dir, max_queue=64, max_batch=32) as s:
        yield s


def _healthy(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return r.json()


def test_completion_matches_the_generator(server, tiny_model_dir):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    want = Generator(load_backend("torch", tiny_model_dir), ByteTokenizer()).generate(
        ["ROMEO:"], SamplingParams(20))[0]
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 20, "total_tokens": 26}


def test_stop_sequence_and_seeded_sampling(server):
    url, _ = server
    req = {"prompt": "To be", "max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 3, "stop": ["e"]}
    a = httpx.post(f"{url}/v1/completions", json=req, timeout=60).json()
    b = httpx.post(f"{url}/v1/completions", json=req, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert "e" not in a["choices"][0]["text"]
    assert a["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"prompt": "hi", "max_tokens": 4, "frobnicate": 1}, 422, "frobnicate"),
        ({"prompt": "hi", "max_tokens": -3}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "exceeds"),
        ({"prompt": "x" * 500, "max_tokens": 4}, 400, "limit is 200"),
        ({"prompt": "", "max_tokens": 4}, 400, "empty"),
        ({"prompt": 12, "max_tokens": 4}, 422, "prompt"),
        ({"max_tokens": 4}, 422, "prompt"),
        ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"prompt": "hi", "n": 2}, 422, "n"),
    ],
)
def test_bad_requests_get_clear_4xx(server, payload, status, fragment):
    url, _ = server
    if isinstance(payload, bytes):
        r = httpx.post(f"{url}/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{url}/v1/completions", json=payload)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    _healthy(url)


def _read_stream(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    text, chunks = [], 0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        done = False
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            text.append(obj["choices"][0]["text"])
            chunks += 1
        assert done
    return "".join(text), chunks


def test_twenty_concurrent_streams_share_batched_decode(server, tiny_model_dir):
    url, engine = server
    prompts = [f"{name}:" for name in ("KING", "QUEEN", "ROMEO", "JULIET", "HAMLET")] * 4
    prompts = [p + " " * (i % 3) for i, p in enumerate(prompts)]  # different prompt lengths
    results: dict[int, tuple[str, int]] = {}

    def worker(i: int) -> None:
        results[i] = _read_stream(url, prompts[i], 16)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 20
    gen = Generator(load_backend("torch", tiny_model_dir), ByteTokenizer())
    want = gen.generate(prompts, SamplingParams(16))
    for i in range(20):
        assert results[i][0] == want[i].text, i
        assert results[i][1] >= 2  # streamed in pieces, not one blob
    metrics = httpx.get(f"{url}/metrics").text
    batch_hist = [ln for ln in metrics.splitlines() if ln.startswith("qmamba_decode_batch_size_bucket")]
    le1 = next(ln for ln in batch_hist if 'le="1.0"' in ln)
    total = next(ln for ln in batch_hist if 'le="+Inf"' in ln)
    assert float(le1.split()[-1]) < float(total.split()[-1])  # some steps decoded several requests at once
    _healthy(url)


def test_client_disconnect_mid_stream_stops_generation(server):
    url, engine = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "KING:", "max_tokens": 64, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    deadline = time.time() + 20
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert 'qmamba_requests_total{outcome="cancelled"}' in httpx.get(f"{url}/metrics").text
    _healthy(url)


def test_metrics_are_prometheus_text(server):
    url, _ = server
    httpx.post(f"{url}/v1/completions", json={"prompt": "A", "max_tokens": 2}, timeout=60)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("qmamba_requests_total", "qmamba_completion_tokens_total", "qmamba_request_latency_seconds_bucket",
                 "qmamba_time_to_first_token_seconds_count", "qmamba_decode_step_seconds_sum"):
        assert name in r.text


def test_queue_full_returns_429_and_server_recovers(tiny_model_dir):
    with live_server(tiny_model_dir, max_queue=1, max_batch=1) as (url, engine):

        async def burst():
            async with httpx.AsyncClient(timeout=120) as c:
                reqs = [c.post(f"{url}/v1/completions", json={"prompt": "KING:", "max_tokens": 48}) for _ in range(8)]
                return await asyncio.gather(*reqs)

        codes = [r.status_code for r in asyncio.run(burst())]
        assert 429 in codes and 200 in codes, codes
        assert set(codes) <= {200, 429}
        for r in asyncio.run(burst()):
            if r.status_code == 429:
                assert "queue is full" in r.json()["error"]["message"]
        deadline = time.time() + 60
        while (engine.active or engine.queued) and time.time() < deadline:
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "KING:", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
        assert 'outcome="rejected_queue_full"' in httpx.get(f"{url}/metrics").text
        _healthy(url)


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_queue": 0}])
def test_engine_refuses_limits_that_hang_or_unbound_it(tiny_model_dir, kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        Engine(load_backend("torch", tiny_model_dir), ByteTokenizer(), **kw)


@pytest.mark.parametrize("kw", [{"max_prompt_tokens": 0}, {"max_tokens_limit": 0}])
def test_app_refuses_limits_that_reject_every_request(tiny_model_dir, kw):
    engine = Engine(load_backend("torch", tiny_model_dir), ByteTokenizer())
    with pytest.raises(ValueError, match=f"{next(iter(kw))} must be at least 1"):
        create_app(engine, "qmamba-tiny", **kw)
