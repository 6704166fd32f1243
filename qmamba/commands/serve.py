"""qmamba generate / qmamba serve."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qmamba.errors import UserError

if TYPE_CHECKING:
    from qmamba.runtime.backends import Backend
    from qmamba.runtime.generate import SamplingParams
    from qmamba.runtime.tokenizer import Tokenizer


DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_PROMPT_TOKENS = 2048


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="float model dir or QDIR (torch); export dir (onnxruntime); engine dir")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"))
    p.add_argument("--recipe", default=None,
                   help="float model: fp32 (default) or fp16; a QDIR, export or engine holds its own recipe")
    p.add_argument("--device", default=None,
                   help="cpu (torch default) or cuda[:N]; onnxruntime runs on the CPU, tensorrt on the GPU")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="where tokenizer.json lives (default: model)")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from prompts")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (at least 1)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    g.set_defaults(func=run_generate)

    s = sub.add_parser("serve", help="OpenAI-style HTTP server: /v1/completions, /health, /metrics")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=64)
    s.add_argument("--max-batch", type=int, default=None,
                   help=f"requests decoded together (default {DEFAULT_MAX_BATCH}, or less where an export / engine "
                        "was built for less; more than it was built for is refused)")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help=f"longest prompt (default {DEFAULT_MAX_PROMPT_TOKENS}, or an export's max_len / an engine's "
                        "prefill length where less; more is refused)")
    s.add_argument("--max-tokens-limit", type=int, default=1024)
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM / Ctrl-C, seconds for open requests to finish before they are ended with an "
                        "error (a second Ctrl-C ends them at once); default 30")
    s.set_defaults(func=run_serve)


def _load(args: argparse.Namespace) -> tuple[Backend, Tokenizer]:
    from qmamba.runtime import load_backend, load_tokenizer
    from qmamba.runtime.tokenizer import tokenizer_file

    if args.tokenizer_dir is not None:  # a wrong path fails before the model loads (load_backend checks the rest)
        tokenizer_file(args.tokenizer_dir)
    backend = load_backend(args.backend, args.model, args.recipe, args.device)
    return backend, load_tokenizer(args.model, backend.vocab_size, args.tokenizer_dir)


def _check_serve_args(args: argparse.Namespace) -> None:
    """Limits that would start a server that hangs, never bounds its queue or refuses every request."""
    for opt in ("max_queue", "max_batch", "max_prompt_tokens", "max_tokens_limit"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be at least 1, got {v}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    if not args.shutdown_timeout >= 0:
        raise UserError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout}")


def _check_address(host: str, port: int) -> None:
    """Bind --host:--port once before the model loads: a taken port or an unknown host is a message then, not
    uvicorn's exit after the load. (Another process can still take the port in between; uvicorn reports that.)"""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address this machine can listen on ({e})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not count
        try:
            sock.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _built_for(backend: Backend, args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    """What the loaded export / engine was built for: {"batch": (largest decode batch, what that is),
    "len": (longest prompt, what that is)}, each only where its metadata says (the torch backend has no limits)."""
    kind = {"onnxruntime": ("the export", "max_batch {} in its export.json", "max_len {} in its export.json"),
            "tensorrt": ("the engine", "the decode profile's largest batch {} in its engine.json",
                         "the prefill profile's longest input {} in its engine.json")}.get(backend.name)
    out = {}
    for key, attr in (("batch", "max_batch"), ("len", "max_len")):
        limit = getattr(backend, attr, None)
        if limit is not None and kind is not None:
            what = kind[1] if key == "batch" else kind[2]
            out[key] = (limit, f"{kind[0]} {args.model} ({what.format(limit)})")
    return out


def _fit_serve_limits(args: argparse.Namespace, backend: Backend) -> tuple[int, int]:
    """--max-batch / --max-prompt-tokens against what an export or engine was built for.

    More than that is refused here, naming both numbers: served, every request beyond it would fail one by one at
    run time (TensorRT: outside its profile) or run shapes the export was never built or checked for. Left out,
    each takes its default, lowered to the model's limit with a notice: an explicit value is never changed."""
    built = _built_for(backend, args)
    out = []
    for opt, value, default, key in (("--max-batch", args.max_batch, DEFAULT_MAX_BATCH, "batch"),
                                     ("--max-prompt-tokens", args.max_prompt_tokens, DEFAULT_MAX_PROMPT_TOKENS, "len")):
        limit, what = built.get(key, (None, ""))
        if value is None:
            value = default
            if limit is not None and limit < default:
                value = limit
                print(f"qmamba serve: using {opt} {limit}, not the default {default}: {what} was built for no more",
                      file=sys.stderr)
        elif limit is not None and value > limit:
            raise UserError(f"{opt} {value} is more than {what} was built for: pass {opt} {limit} or less, "
                            f"or re-export / rebuild it for {value}")
        out.append(value)
    return out[0], out[1]


def _check_generate_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling options, checked under their own names (not SamplingParams' field names)."""
    from qmamba.runtime.generate import SEED_MAX, SEED_MIN, SamplingParams

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not SEED_MIN <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be between {SEED_MIN} and {SEED_MAX}, got {args.seed}")
    if any(not s for s in args.stop):
        raise UserError("--stop takes a non-empty string")
    return SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))


def run_generate(args: argparse.Namespace) -> int:
    from qmamba.runtime import Generator

    params = _check_generate_args(args)
    if args.stream and len(args.prompt) != 1:
        raise UserError("--stream takes exactly one --prompt")
    backend, tok = _load(args)
    built = _built_for(backend, args)  # refused here, not part-way through at run time
    if "batch" in built and len(args.prompt) > built["batch"][0]:
        limit, what = built["batch"]
        raise UserError(f"{len(args.prompt)} prompts are decoded as one batch, more than {what} was built for: "
                        f"pass at most {limit} --prompt, or re-export / rebuild it")
    if "len" in built:
        limit, what = built["len"]
        for p in args.prompt:
            if len(tok.encode(p)) > limit:
                raise UserError(f"a --prompt of {len(tok.encode(p))} tokens is longer than {what} was built for")
    gen = Generator(backend, tok)
    if args.stream:
        sys.stdout.write(args.prompt[0])
        gen.generate(args.prompt, params, on_text=lambda i, t: (sys.stdout.write(t), sys.stdout.flush()) and None)
        sys.stdout.write("\n")
        return 0
    for c in gen.generate(args.prompt, params):
        print(f"{c.prompt}{c.text}\n[{c.finish_reason}, {len(c.token_ids)} tokens]")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    _check_serve_args(args)
    try:
        from qmamba.server.app import create_app
        from qmamba.server.engine import Engine
        from qmamba.server.run import serve
    except ImportError as e:
        raise UserError(f"qmamba serve needs the serve extra, which is not installed ({e}): "
                        "pip install -e '.[serve]'") from e
    _check_address(args.host, args.port)
    backend, tok = _load(args)
    max_batch, max_prompt_tokens = _fit_serve_limits(args, backend)
    engine = Engine(backend, tok, max_queue=args.max_queue, max_batch=max_batch)
    app = create_app(engine, args.model.name, max_prompt_tokens, args.max_tokens_limit)
    serve(app, engine, args.host, args.port, args.shutdown_timeout)
    return 0
