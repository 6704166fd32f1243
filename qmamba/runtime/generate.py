"""Batched generation over a per-layer conv/SSM state cache.

Requests with different prompt lengths are prefilled one by one (each on a fresh state), then all
active requests advance together in one batched decode step per token. A request leaves the batch
when it hits max_new_tokens or a stop sequence; its state rows are dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from qmamba.runtime.backends import Backend
from qmamba.runtime.tokenizer import Tokenizer


class SamplingError(ValueError):
    """Invalid sampling parameters."""


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also NaN, which would sample from NaN probabilities
            raise SamplingError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise SamplingError("stop sequences must be non-empty strings")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SamplingError(f"seed must be between {SEED_MIN} and {SEED_MAX}, got {self.seed}")


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "cancelled"
    prompt_tokens: int


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """One token from [V] logits: greedy, or temperature + top-k + top-p (nucleus)."""
    if p.temperature == 0:
        return int(torch.argmax(logits))
    x = logits.double() / p.temperature
    if p.top_k:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x = torch.where(x < kth, torch.tensor(-float("inf"), dtype=x.dtype), x)
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < p.top_p  # smallest prefix with mass >= top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[si[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.float(), 1, generator=gen))


@dataclasses.dataclass
class _Active:
    idx: int
    params: SamplingParams
    gen: torch.Generator | None
    tokens: list[int]
    text: str = ""
    emitted: int = 0  # characters already streamed
    done: str | None = None


TokenCallback = Callable[[int, str], bool | None]  # (request index, new text) -> False to cancel


class DecodeBatch:
    """Requests that advance together, one batched decode step at a time (continuous batching).

    ``admit`` prefills a request on its own state and appends it to the batch; ``step`` samples one
    token for every active request, reports new text, retires finished ones and runs the batched
    decode; ``cancel`` retires a request at the next step.
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer) -> None:
        self.backend = backend
        self.tok = tokenizer
        self.active: list[_Active] = []
        self.state = None
        self.logits: torch.Tensor | None = None
        self.prompt_tokens: dict[int, int] = {}
        self._cancelled: set[int] = set()

    def __len__(self) -> int:
        return len(self.active)

    def admit(self, idx: int, ids: list[int], params: SamplingParams) -> None:
        """Prefill and join the batch; if anything raises, the batch is as it was (the others go on)."""
        lg, st = self.backend.prefill(torch.tensor([ids]))
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        if self.state is None:
            state, logits = st, lg
        else:
            state = self.backend.cat_states([self.state, st])
            logits = torch.cat([self.logits, lg])
        self.active.append(_Active(idx, params, gen, []))
        self.prompt_tokens[idx] = len(ids)
        self.state, self.logits = state, logits

    def cancel(self, idx: int) -> None:
        self._cancelled.add(idx)

    def step(self, on_text: TokenCallback | None = None) -> list[_Active]:
        """One token for every active request; returns the requests that finished."""
        if not self.active:
            return []
        tokens = []
        for row, a in enumerate(self.active):
            if a.idx in self._cancelled:
                a.done = "cancelled"
                tokens.append(0)
                continue
            t = sample(self.logits[row], a.params, a.gen)
            a.tokens.append(t)
            tokens.append(t)
            _advance_text(self.tok, a, on_text)
        finished = [a for a in self.active if a.done is not None]
        keep = [r for r, a in enumerate(self.active) if a.done is None]
        for a in finished:  # nothing of a finished request stays behind (a server's batch lives for days)
            self._cancelled.discard(a.idx)
            self.prompt_tokens.pop(a.idx, None)
        if not keep:
            self.active, self.state, self.logits = [], None, None
            return finished
        if len(keep) != len(self.active):
            self.state = self.backend.select_states(self.state, keep)
            self.active = [self.active[r] for r in keep]
            tokens = [tokens[r] for r in keep]
        self.logits, self.state = self.backend.decode(torch.tensor(tokens), self.state)
        return finished


class Generator:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, max_prompt_tokens: int = 4096) -> None:
        self.backend = backend
        self.tok = tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt)
        if not ids:
            raise SamplingError("the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise SamplingError(f"the prompt has {len(ids)} tokens, more than the limit {self.max_prompt_tokens}")
        return ids

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        on_text: TokenCallback | None = None,
    ) -> list[Completion]:
        """Generate for every prompt; on_text(i, new_text) streams, returning False cancels request i."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        encoded = [self.encode_prompt(p) for p in prompts]
        batch = DecodeBatch(self.backend, self.tok)
        for i, (ids, p) in enumerate(zip(encoded, plist, strict=True)):
            batch.admit(i, ids, p)
        results: dict[int, _Active] = {}
        while len(batch):
            for a in batch.step(on_text):
                results[a.idx] = a
        return [
            Completion(prompts[i], results[i].text, results[i].tokens, results[i].done, len(encoded[i]))
            for i in range(len(prompts))
        ]


def _advance_text(tok: Tokenizer, a: _Active, on_text: TokenCallback | None) -> None:
    text = tok.decode(a.tokens)
    stop_at = None
    for s in a.params.stop:
        j = text.find(s)
        if j >= 0 and (stop_at is None or j < stop_at):
            stop_at = j
    if stop_at is not None:
        text, a.done = text[:stop_at], "stop"
    elif len(a.tokens) >= a.params.max_new_tokens:
        a.done = "length"
    # hold back a possible partial stop sequence / partial UTF-8 character while streaming
    safe = len(text) if a.done else _safe_prefix(text, a.params.stop)
    if on_text is not None and safe > a.emitted:
        if on_text(a.idx, text[a.emitted : safe]) is False and a.done is None:
            a.done = "cancelled"
        a.emitted = safe
    a.text = text


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    n = len(text)
    if text.endswith("\ufffd"):
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n = min(n, len(text[:n]) - k)
                break
    return max(n, 0)
