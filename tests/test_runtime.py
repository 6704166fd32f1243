"""Generation runtime on the torch backend (CPU)."""

from __future__ import annotations

import pytest
import torch
from qm_testutil import rand_ids

from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.recipes import get_recipe
from qmamba.runtime import ByteTokenizer, Generator, SamplingParams, TorchBackend, load_backend
from qmamba.runtime.generate import SamplingError, sample


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator(load_backend("torch", tiny_model_dir), ByteTokenizer(), max_prompt_tokens=64)


def test_batched_generation_equals_one_by_one(gen):
    prompts = ["KING:", "Now is the winter", "O"]
    params = [SamplingParams(12), SamplingParams(20), SamplingParams(7)]
    together = gen.generate(prompts, params)
    alone = [gen.generate([p], q)[0] for p, q in zip(prompts, params, strict=True)]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [len(c.token_ids) for c in together] == [12, 20, 7]
    assert all(c.finish_reason == "length" for c in together)


def test_streamed_pieces_add_up_to_the_text(gen):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    out = gen.generate(["ROMEO:", "JULIET:"], SamplingParams(16, stop=("\n",)),
                       on_text=lambda i, t: pieces[i].append(t))
    for i, c in enumerate(out):
        assert "".join(pieces[i]) == c.text
        assert "\n" not in c.text


def test_stop_sequence_truncates_and_reports_stop(gen):
    free = gen.generate(["KING:"], SamplingParams(40))[0].text
    stop = free[5:7]
    c = gen.generate(["KING:"], SamplingParams(40, stop=(stop,)))[0]
    assert c.finish_reason == "stop" and c.text == free[: free.index(stop)]


def test_callback_can_cancel(gen):
    c = gen.generate(["KING:"], SamplingParams(50), on_text=lambda i, t: False)[0]
    assert c.finish_reason == "cancelled" and len(c.token_ids) == 1


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(gen):
    p = SamplingParams(20, temperature=1.0, top_p=0.9, seed=11)
    assert gen.generate(["A"], p)[0].text == gen.generate(["A"], p)[0].text
    greedy = gen.generate(["A"], SamplingParams(20))[0].text
    assert gen.generate(["A"], SamplingParams(20, temperature=0.7, top_k=1, seed=1))[0].text == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample(logits, SamplingParams(1, temperature=1.0, top_p=0.75), torch.Generator().manual_seed(s))
            for s in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("kw", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2},
                                {"stop": ("",)}])
def test_invalid_sampling_params(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)


def test_prompt_limits(gen):
    with pytest.raises(SamplingError, match="empty"):
        gen.generate([""], SamplingParams(2))
    with pytest.raises(SamplingError, match="limit 64"):
        gen.generate(["x" * 65], SamplingParams(2))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("tpu", "models/qmamba-tiny")


def test_quantized_backend_prefill_plus_decode_equals_longer_prefill(small_model):
    q = calibrate(small_model, get_recipe("w8a8-dualscale"), rand_ids(4, 16), CalibOptions(), progress=False)
    be = TorchBackend(q)
    ids = rand_ids(2, 12, seed=9)
    logits, st = be.prefill(ids[:, :9])
    for t in range(9, 12):
        logits, st = be.decode(ids[:, t], st)
    full, _ = be.prefill(ids)
    assert (logits - full).abs().max().item() < 1e-5
    both = be.cat_states([be.select_states(st, [1]), be.select_states(st, [0])])
    assert torch.equal(both[0].conv[0], st[0].conv[1]) and torch.equal(both[0].ssm[1], st[0].ssm[0])


def test_greedy_generation_identical_torch_and_onnxruntime(tiny_model_dir, tmp_path):
    from export.exporter import export
    from qmamba.quant.checkpoint import load_quantized, save_quantized
    from qmamba.runtime.ort_backend import OrtBackend

    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    from qmamba.model.checkpoint import load_model

    q = calibrate(load_model(tiny_model_dir), get_recipe("w8a8-dualscale"), calib, CalibOptions(), progress=False)
    save_quantized(q, tmp_path / "q")
    export(tmp_path / "q", tmp_path / "onnx")
    prompts = ["KING:", "To be, or not to be", "O Romeo"]
    params = [SamplingParams(24), SamplingParams(16), SamplingParams(20, stop=("\n",))]
    a = Generator(TorchBackend(load_quantized(tmp_path / "q")), ByteTokenizer()).generate(prompts, params)
    b = Generator(OrtBackend(tmp_path / "onnx"), ByteTokenizer()).generate(prompts, params)
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_cuda_ops_refuse_to_settle_x_proj_sums_without_the_fused_update():
    """x_proj's sums left by in_proj_conv_x_proj have exactly one reader, the fused state update: any other path
    gets a clear error instead of sums that nobody turns into codes (no GPU needed: the check is host-side)."""
    from qmamba.runtime.cuda_model import CudaOps, XProjSums

    ops = CudaOps(torch.device("cpu"))
    sums = XProjSums(torch.zeros(80, dtype=torch.int32), torch.ones(80), None)
    with pytest.raises(ValueError, match="read only by the fused state update"):
        ops._settle(sums)
