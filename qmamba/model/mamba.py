"""Floating-point Mamba-1 causal LM: the reference that every quantized recipe is compared with.

Parameter names follow Hugging Face's MambaForCausalLM (``backbone.layers.N.mixer.in_proj.weight``),
so an HF state dict loads as is. Activations are [B, L, C]; the residual stream is float32; the conv
state is [B, D, K-1] and the SSM state [B, D, N], both float32. Linears run in the module's dtype
(fp32 / fp16 / bf16).

``fast=True`` (training) swaps the spec's float64-rounded functions for plain float32 ones; the
default path uses the spec formulas of docs/quantization.md so the fp16 recipe is comparable stage
by stage with the quantized ones.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from qmamba import trace
from qmamba.config import MambaConfig
from qmamba.ops import ref
from qmamba.ops.hadamard import hadamard_transform
from qmamba.ops.specmath import a_from_a_log, rmsnorm


@dataclasses.dataclass
class LayerState:
    conv: torch.Tensor  # [B, D, K-1]  (float32 here; int8 codes in the int8 recipes)
    ssm: torch.Tensor  # [B, D, N] float32


def check_inputs(input_ids: torch.Tensor, states: list[LayerState] | None, n_layer: int) -> None:
    """The forward() contract shared by the float and quantized models."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if states is not None and len(states) != n_layer:
        raise ValueError(f"states has {len(states)} layers, model has {n_layer}")


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if fast:
            x = x.float()
            return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight.float()
        return rmsnorm(x, self.weight, self.eps)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d, n, r, k = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=False)
        self.conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.d_model, bias=False)

    def conv_bias(self) -> torch.Tensor:
        if self.conv1d.bias is None:
            return torch.zeros(self.cfg.d_inner, device=self.conv1d.weight.device)
        return self.conv1d.bias

    def forward(
        self, h: torch.Tensor, state: LayerState | None, fast: bool = False
    ) -> tuple[torch.Tensor, LayerState]:
        cfg, i = self.cfg, self.layer_idx
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        wdt = self.in_proj.weight.dtype
        xz = self.in_proj(h.to(wdt)).float()
        x, z = xz[..., :d], xz[..., d:]
        trace.record(trace.stage_name(i, "in_proj.x"), x)
        trace.record(trace.stage_name(i, "in_proj.z"), z)

        w = self.conv1d.weight[:, 0, :].float()
        if fast:
            u, conv_state = _conv_fast(x, w, self.conv_bias().float(), None if state is None else state.conv)
        else:
            u, conv_state = ref.causal_conv1d_silu(
                x, w, self.conv_bias().float(), None if state is None else state.conv
            )
        trace.record(trace.stage_name(i, "conv1d"), u)

        xdbl = self.x_proj(u.to(wdt)).float()
        dt_lr, B, C = xdbl[..., :r], xdbl[..., r : r + n], xdbl[..., r + n :]
        trace.record(trace.stage_name(i, "x_proj.dt_lowrank"), dt_lr)
        trace.record(trace.stage_name(i, "x_proj.B"), B)
        trace.record(trace.stage_name(i, "x_proj.C"), C)
        dt = F.linear(dt_lr.to(wdt), self.dt_proj.weight).float()
        trace.record(trace.stage_name(i, "dt_proj"), dt)

        dt_bias = self.dt_proj.bias.float()
        ssm0 = None if state is None else state.ssm
        if fast:
            y, ssm_state = _scan_fast(u, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z, dt_bias, ssm0)
        else:
            y, ssm_state = ref.selective_scan(
                u, dt, a_from_a_log(self.A_log.float()), B, C, self.D.float(), z, dt_bias, ssm0
            )
        trace.record(trace.stage_name(i, "ssm"), y)
        tr = trace.active()
        if tr is not None and tr.wants(trace.stage_name(i, "hadamard")):
            trace.record(trace.stage_name(i, "hadamard"), hadamard_transform(y))
        out = self.out_proj(y.to(wdt)).float()
        trace.record(trace.stage_name(i, "out_proj"), out)
        return out, LayerState(conv_state, ssm_state)


def _conv_fast(x, w, bias, conv_state):
    bsz, seqlen, d = x.shape
    k = w.shape[1]
    if conv_state is None:
        conv_state = x.new_zeros(bsz, d, k - 1)
    xt = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], 1)
    v = F.conv1d(xt.transpose(1, 2), w[:, None, :], bias, groups=d).transpose(1, 2)
    return F.silu(v), xt[:, seqlen:].transpose(1, 2).contiguous()


def _scan_fast(u, dt, A, B, C, Dskip, z, dt_bias, h0):
    """Plain float32 scan for training (autograd-friendly; no float64)."""
    bsz, seqlen, d = u.shape
    delta = F.softplus(dt + dt_bias)
    h = u.new_zeros(bsz, d, A.shape[1]) if h0 is None else h0
    da = torch.exp(delta.unsqueeze(-1) * A)  # [B, L, D, N]
    dbu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    ys = []
    # unbind, not da[:, t]: the backward of a slice allocates a full-size gradient per step
    for da_t, dbu_t, c_t in zip(da.unbind(1), dbu.unbind(1), C.unbind(1), strict=True):
        h = da_t * h + dbu_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    y = torch.stack(ys, 1) + Dskip * u
    return y * F.silu(z), h


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mixer = MambaMixer(cfg, layer_idx)


class Backbone(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MambaBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class MambaLM(nn.Module):
    """Mamba-1 causal LM with prefill (any L) and decode (L = 1 with states)."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def init_weights(self, seed: int = 0) -> MambaLM:
        """mamba_ssm-style initialisation (dt bias from a log-uniform dt in [1e-3, 1e-1])."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        with torch.no_grad():
            self.backbone.embeddings.weight.normal_(0, 0.02, generator=g)
            for blk in self.backbone.layers:
                m = blk.mixer
                for lin in (m.in_proj, m.x_proj, m.out_proj):
                    bound = 1 / lin.weight.shape[1] ** 0.5
                    lin.weight.uniform_(-bound, bound, generator=g)
                m.out_proj.weight.div_((2 * cfg.n_layer) ** 0.5)
                std = cfg.dt_rank**-0.5
                m.dt_proj.weight.uniform_(-std, std, generator=g)
                dt = torch.exp(torch.rand(cfg.d_inner, generator=g) * (torch.log(torch.tensor(0.1)) -
                               torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3))).clamp(min=1e-4)
                m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                bound = 1 / cfg.d_conv**0.5
                m.conv1d.weight.uniform_(-bound, bound, generator=g)
                if m.conv1d.bias is not None:
                    m.conv1d.bias.uniform_(-bound, bound, generator=g)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        states: list[LayerState] | None = None,
        fast: bool = False,
    ) -> tuple[torch.Tensor, list[LayerState]]:
        check_inputs(input_ids, states, self.cfg.n_layer)
        residual = self.backbone.embeddings(input_ids).float()
        new_states = []
        for i, blk in enumerate(self.backbone.layers):
            h = blk.norm(residual, fast)
            trace.record(trace.stage_name(i, "norm"), h)
            out, st = blk.mixer(h, None if states is None else states[i], fast)
            residual = residual + out
            trace.record(trace.stage_name(i, "block"), residual)
            new_states.append(st)
        hf = self.backbone.norm_f(residual, fast)
        trace.record("norm_f", hf)
        logits = F.linear(hf.to(self.lm_head.weight.dtype), self.lm_head.weight).float()
        trace.record("logits", logits)
        return logits, new_states
