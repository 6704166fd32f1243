"""Mamba-1 model configuration, readable from Hugging Face and mamba_ssm config.json files."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that does not describe a Mamba-1 model."""


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 -> ceil(d_model / 16)
    rms_norm_eps: float = 1e-5
    use_conv_bias: bool = True
    use_bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.use_bias:
            raise ConfigError("in_proj/out_proj biases (use_bias=true) are not supported by the spec")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def to_hf(self) -> dict:
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "time_step_rank": self.dt_rank,
            "layer_norm_epsilon": self.rms_norm_eps,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "tie_word_embeddings": self.tie_embeddings,
            "residual_in_fp32": True,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MambaConfig:
        if "hidden_size" in d:  # Hugging Face MambaConfig
            if d.get("model_type", "mamba") != "mamba":
                raise ConfigError(f"model_type {d.get('model_type')!r} is not 'mamba' (Mamba-1)")
            expand = d.get("expand", 2)
            inter = d.get("intermediate_size", expand * d["hidden_size"])
            if inter != expand * d["hidden_size"]:
                raise ConfigError(f"intermediate_size {inter} != expand * hidden_size")
            rank = d.get("time_step_rank", "auto")
            return cls(
                d_model=d["hidden_size"],
                n_layer=d["num_hidden_layers"],
                vocab_size=d["vocab_size"],
                d_state=d.get("state_size", 16),
                d_conv=d.get("conv_kernel", 4),
                expand=expand,
                dt_rank=0 if rank == "auto" else int(rank),
                rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                use_conv_bias=d.get("use_conv_bias", True),
                use_bias=d.get("use_bias", False),
                tie_embeddings=d.get("tie_word_embeddings", True),
            )
        if "d_model" in d:  # mamba_ssm MambaConfig
            ssm = d.get("ssm_cfg", {}) or {}
            if ssm.get("layer", "Mamba1") != "Mamba1":
                raise ConfigError(f"ssm_cfg.layer {ssm.get('layer')!r} is not Mamba1")
            vocab = d["vocab_size"]
            mult = d.get("pad_vocab_size_multiple", 8)
            if vocab % mult:
                vocab += mult - vocab % mult
            rank = ssm.get("dt_rank", "auto")
            return cls(
                d_model=d["d_model"],
                n_layer=d["n_layer"],
                vocab_size=vocab,
                d_state=ssm.get("d_state", 16),
                d_conv=ssm.get("d_conv", 4),
                expand=ssm.get("expand", 2),
                dt_rank=0 if rank == "auto" else int(rank),
                rms_norm_eps=d.get("norm_epsilon", 1e-5),
                use_conv_bias=ssm.get("conv_bias", True),
                use_bias=ssm.get("bias", False),
                tie_embeddings=d.get("tie_embeddings", True),
            )
        raise ConfigError("config.json has neither 'hidden_size' (Hugging Face) nor 'd_model' (mamba_ssm)")

    @classmethod
    def load(cls, model_dir: str | Path) -> MambaConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs config.json")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read a Mamba config ({type(e).__name__}: {e})") from e
