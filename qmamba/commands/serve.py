"""qmamba generate / qmamba serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qmamba.errors import UserError

if TYPE_CHECKING:
    from qmamba.runtime.backends import Backend
    from qmamba.runtime.tokenizer import Tokenizer


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
    g.add_argument("--max-tokens", type=int, default=64)
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
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--max-prompt-tokens", type=int, default=2048)
    s.add_argument("--max-tokens-limit", type=int, default=1024)
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
        if v < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be at least 1, got {v}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")


def run_generate(args: argparse.Namespace) -> int:
    from qmamba.runtime import Generator, SamplingParams

    params = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    if args.stream and len(args.prompt) != 1:
        raise UserError("--stream takes exactly one --prompt")
    backend, tok = _load(args)
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
        import uvicorn

        from qmamba.server.app import create_app
        from qmamba.server.engine import Engine
    except ImportError as e:
        raise UserError(f"qmamba serve needs the serve extra, which is not installed ({e}): "
                        "pip install -e '.[serve]'") from e
    backend, tok = _load(args)
    engine = Engine(backend, tok, max_queue=args.max_queue, max_batch=args.max_batch)
    app = create_app(engine, args.model.name, args.max_prompt_tokens, args.max_tokens_limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
