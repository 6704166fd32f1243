"""qmamba generate / qmamba serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="float model dir or QDIR (torch); export dir (onnxruntime); engine dir")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"))
    p.add_argument("--recipe", default=None, help="torch backend with a float model: fp16 or fp32 (default)")
    p.add_argument("--device", default="cpu")
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


def _load(args):
    from qmamba.runtime import load_backend, load_tokenizer

    backend = load_backend(args.backend, args.model, args.recipe, args.device)
    tok_dir = args.tokenizer_dir or args.model
    return backend, load_tokenizer(tok_dir, backend.vocab_size)


def run_generate(args: argparse.Namespace) -> int:
    from qmamba.runtime import Generator, SamplingParams

    backend, tok = _load(args)
    params = SamplingParams(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    gen = Generator(backend, tok)
    if args.stream:
        if len(args.prompt) != 1:
            raise ValueError("--stream takes exactly one --prompt")
        sys.stdout.write(args.prompt[0])
        gen.generate(args.prompt, params, on_text=lambda i, t: (sys.stdout.write(t), sys.stdout.flush()) and None)
        sys.stdout.write("\n")
        return 0
    for c in gen.generate(args.prompt, params):
        print(f"{c.prompt}{c.text}\n[{c.finish_reason}, {len(c.token_ids)} tokens]")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qmamba.server.app import create_app
    from qmamba.server.engine import Engine

    backend, tok = _load(args)
    engine = Engine(backend, tok, max_queue=args.max_queue, max_batch=args.max_batch)
    app = create_app(engine, args.model.name, args.max_prompt_tokens, args.max_tokens_limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
