"""OpenAI-style completions server (FastAPI): POST /v1/completions, GET /health, GET /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from qmamba.runtime.generate import SEED_MAX, SEED_MIN, SamplingError, SamplingParams
from qmamba.server.engine import Engine, Event, QueueFull, Unavailable


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # what torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        v = [v] if isinstance(v, str) else v
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop must be up to 4 non-empty strings")
        return tuple(v)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: Engine, model_name: str, max_prompt_tokens: int = 2048, max_tokens_limit: int = 1024,
               start_engine: bool = True) -> FastAPI:
    for name, v in (("max_prompt_tokens", max_prompt_tokens), ("max_tokens_limit", max_tokens_limit)):
        if v < 1:  # would refuse every request
            raise ValueError(f"{name} must be at least 1, got {v}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            engine.start()
        yield
        if start_engine:
            engine.stop()

    app = FastAPI(title="qmamba", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        parts = []
        for e in errs:
            loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return _error(422, "; ".join(parts), "invalid_request_error")

    @app.get("/health")
    async def health():
        # 503 unless requests are served: a load balancer reads the status code
        status = "error" if not engine.alive else "ok" if engine.accepting else "shutting_down"
        body = {"status": status, "model": model_name, "backend": engine.backend.name,
                "active": engine.active, "queued": engine.queued, "last_error": engine.last_error}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.max_tokens > max_tokens_limit:
            return _error(400, f"max_tokens {body.max_tokens} exceeds this server's limit {max_tokens_limit}",
                          "invalid_request_error")
        ids = engine.tok.encode(body.prompt)
        if not ids:
            return _error(400, "prompt is empty", "invalid_request_error")
        if len(ids) > max_prompt_tokens:
            return _error(400, f"prompt has {len(ids)} tokens; the limit is {max_prompt_tokens}",
                          "invalid_request_error")
        try:
            params = SamplingParams(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed,
                                    tuple(body.stop or ()))
        except SamplingError as e:
            return _error(400, str(e), "invalid_request_error")
        try:
            req = engine.submit(ids, params)
        except QueueFull:
            return _error(429, "the server's request queue is full; retry later", "rate_limit_error")
        except Unavailable as e:
            return _error(503, str(e), "server_error")
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        name = body.model or model_name

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        if body.stream:
            async def events():
                try:
                    while True:
                        ev: Event = await req.events.get()
                        if ev.error:
                            err = {"message": ev.error, "type": "server_error", "code": ev.status}
                            yield f"data: {json.dumps({'error': err})}\n\n"
                            return
                        yield f"data: {json.dumps(chunk(ev.text, ev.finish_reason))}\n\n"
                        if ev.finish_reason:
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    engine.cancel(req)  # no-op when finished; stops generation when the client left

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        text = []
        # The client may leave at any time, also while tokens keep coming: watch the connection all along.
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(req.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    engine.cancel(req)
                    return Response(status_code=499)
                ev: Event = get.result()
                if ev.error:
                    msg = ev.error if ev.status == 503 else f"generation failed: {ev.error}"
                    return _error(ev.status, msg, "server_error")
                text.append(ev.text)
                if ev.finish_reason:
                    break
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        finally:
            gone.cancel()
        out = chunk("".join(text), ev.finish_reason)
        out["usage"] = {"prompt_tokens": len(ids), "completion_tokens": ev.completion_tokens,
                        "total_tokens": len(ids) + ev.completion_tokens}
        return out

    return app
