"""The float reference model against transformers.MambaForCausalLM (pure-PyTorch path, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from qmamba.config import MambaConfig
from qmamba.model.checkpoint import load_model, save_model
from qmamba.model.mamba import MambaLM

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hc = transformers.MambaConfig(hidden_size=768, num_hidden_layers=2, vocab_size=512, state_size=16,
                                  conv_kernel=4, expand=2, time_step_rank=48)
    hf = transformers.MambaForCausalLM(hc).eval()
    ours = MambaLM(MambaConfig.from_dict(hc.to_dict()))
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


def test_dims_are_mamba_130m(pair):
    cfg = pair[1].cfg
    assert (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv) == (768, 1536, 16, 48, 4)


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    ref = hf(ids).logits
    got, _ = ours(ids)
    assert (ref - got).abs().max().item() <= 1e-4


@torch.no_grad()
def test_prefill_then_decode_equals_prefill(pair):
    _, ours = pair
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(4))
    full, _ = ours(ids)
    k = 5
    part, states = ours(ids[:, :-k])
    outs = [part]
    for t in range(ids.shape[1] - k, ids.shape[1]):
        step, states = ours(ids[:, t : t + 1], states)
        outs.append(step)
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_save_load_roundtrip_hf_layout(pair, tmp_path):
    hf, ours = pair
    save_model(ours, tmp_path / "m")
    again = load_model(tmp_path / "m")
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(ours(ids)[0], again(ids)[0])
    # the directory we write is readable by transformers itself
    hf2 = transformers.MambaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (hf2(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_loads_mamba_ssm_names(pair, tmp_path):
    import json

    from safetensors.torch import save_file

    _, ours = pair
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.contiguous()
          for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    d = tmp_path / "ssm"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"d_model": 768, "n_layer": 2, "vocab_size": 512,
                                               "pad_vocab_size_multiple": 8, "ssm_cfg": {}}))
    m = load_model(d)
    ids = torch.randint(0, 512, (1, 7))
    assert torch.equal(m(ids)[0], ours(ids)[0])


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@torch.no_grad()
def test_half_precisions_run_close_to_fp32(pair, tmp_path, dtype, tol):
    _, ours = pair
    save_model(ours, tmp_path / "m")
    half = load_model(tmp_path / "m", dtype)
    ids = torch.randint(0, 512, (1, 12))
    a, b = ours(ids)[0], half(ids)[0]
    assert ((a - b).norm() / a.norm()).item() < tol  # bf16 has 8 mantissa bits, fp16 11
