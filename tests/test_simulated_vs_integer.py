"""The simulated (fake-quant) path must reproduce the integer path on the shipped tiny model.

Every integer tensor identical; every float tensor within 1e-6 relative L2; every layer and stage;
every recipe (fp16 has no quantized tensors: its simulated and integer paths are the same float
model, so it is covered by the float-model tests).
"""

from __future__ import annotations

import pytest
import torch
from qm_testutil import QUANT_RECIPES, rand_ids

from qmamba import trace
from qmamba.data import load_text, sample_windows
from qmamba.model.checkpoint import load_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.recipes import get_recipe


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.mark.parametrize("recipe", QUANT_RECIPES)
def test_simulated_equals_integer_every_stage(tiny, text_file, recipe):
    calib = sample_windows(load_text(str(text_file)), 8, 64, seed=0)
    q = calibrate(tiny, get_recipe(recipe), calib, CalibOptions(), progress=False)
    ids = sample_windows(load_text(str(text_file)), 2, 48, seed=1)
    with trace.trace() as ti:
        li, si = q(ids)
    with trace.trace() as ts:
        ls, ss = q(ids, simulate=True)
    assert ti.names == ts.names
    n_int = n_float = 0
    for name in ti.names:
        a, b = ti.get(name), ts.get(name)
        assert type(a) is type(b), name
        if isinstance(a, trace.QTensor):
            assert a.codes.dtype == torch.int8 and torch.equal(a.codes, b.codes), f"{recipe} {name} codes differ"
            assert a.scale == b.scale
            assert (a.mask is None) == (b.mask is None)
            if a.mask is not None:
                assert torch.equal(a.mask, b.mask), f"{recipe} {name} mask differs"
            n_int += 1
        elif a.dtype == torch.uint8:
            assert torch.equal(a, b), name
        else:
            rel = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
            assert rel <= 1e-6, f"{recipe} {name}: rel L2 {rel:.3e}"
            n_float += 1
    # the integer path really is integer: the quantized stages carry int8 codes
    expected_int = {"w8a8": 9, "w8a8-dualscale": 9, "w8a8-fpssm": 2}[recipe] * tiny.cfg.n_layer
    assert n_int == expected_int
    assert n_float > 0
    for a, b in zip(si, ss, strict=True):
        assert torch.equal(a.ssm, b.ssm) or ((a.ssm - b.ssm).norm() / a.ssm.norm()) <= 1e-6


@pytest.mark.parametrize("recipe", QUANT_RECIPES)
def test_prefill_plus_decode_equals_prefill_integer_path(small_model, recipe):
    q = calibrate(small_model, get_recipe(recipe), rand_ids(4, 32), CalibOptions(), progress=False)
    ids = rand_ids(3, 20, seed=5)
    with trace.trace(include=r"layers\..*") as whole:
        full, fs = q(ids)
    with trace.trace(include=r"layers\..*") as steps:
        _, st = q(ids[:, :13])
        for t in range(13, 20):
            _, st = q(ids[:, t : t + 1], st)
    for name in whole.names:
        a, b = whole.get(name), steps.get(name)
        if isinstance(a, trace.QTensor):
            assert torch.equal(a.codes, b.codes), name
        elif not a.is_floating_point():
            assert torch.equal(a, b), name
        else:
            assert ((a - b).norm() / a.norm().clamp_min(1e-30)) <= 1e-6, name
    for a, b in zip(fs, st, strict=True):
        assert torch.equal(a.conv, b.conv)
        assert ((a.ssm - b.ssm).norm() / a.ssm.norm()) <= 1e-6
