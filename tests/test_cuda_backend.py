"""The torch backend on a GPU (qmamba/runtime/cuda_model.py) against the CPU integer path.

Marked `gpu`; without a CUDA device every test skips with the reason. The tiny model, calibrated here, runs
through the kernels + int8 GEMMs: every integer stage before the first scan is identical to the CPU integer
path; the scan's float output is within 1e-5 (fast float32 math in the kernel), after which int8 codes may
differ by one step at rounding ties (<= 0.1% of them) and logits stay within 2% relative L2; prefill +
graph-replayed decode steps equal a longer prefill; greedy generation matches the CPU backend.
"""

from __future__ import annotations

import pytest
import torch
from qm_testutil import rand_ids

from qmamba import trace
from qmamba.model.checkpoint import load_model
from qmamba.quant.calibrate import CalibOptions, calibrate
from qmamba.quant.recipes import get_recipe
from qmamba.runtime.backends import TorchBackend
from qmamba.runtime.generate import Generator, SamplingParams
from qmamba.runtime.tokenizer import ByteTokenizer

NO_GPU = "no CUDA GPU: CUDA backend tests run on the H100"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


@pytest.fixture(scope="module", params=["w8a8-dualscale", "w8a8"])
def qmodel(request, tiny_model_dir):
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    return calibrate(load_model(tiny_model_dir), get_recipe(request.param), calib, CalibOptions(), progress=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("b", "l"), [(1, 1), (3, 7), (1, 300)])
def test_stages_match_the_cpu_integer_path(qmodel, b, l):
    from qmamba.runtime.cuda_model import CudaQuantModel

    ids = rand_ids(b, l, seed=b * 100 + l)
    gpu = CudaQuantModel(qmodel)
    with trace.trace() as t_cpu:
        logits_cpu, _ = qmodel(ids)
    with trace.trace() as t_gpu:
        logits_gpu, _ = gpu(ids)
    cpu, dev = t_cpu.as_dict(), t_gpu.as_dict()
    for name in ("layers.0.norm", "layers.0.in_proj.x", "layers.0.in_proj.z", "layers.0.conv1d",
                 "layers.0.x_proj.dt_lowrank", "layers.0.x_proj.B", "layers.0.x_proj.C", "layers.0.dt_proj"):
        a, g = cpu[name], dev[name]
        assert torch.equal(a.codes, g.codes), f"{name}: integer codes differ"
        if a.mask is not None:
            assert torch.equal(a.mask, g.mask), f"{name}: outlier masks differ"
    assert rel(dev["layers.0.ssm"], cpu["layers.0.ssm"]) <= 1e-5
    # right after the scan, int8 codes may differ at rounding ties (the scan is fast float32 math) by one step;
    # later layers see inputs that already differ, so only the logits are bounded from there on
    a, g = cpu["layers.0.hadamard"].codes.int(), dev["layers.0.hadamard"].codes.int()
    diff = (a - g).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, "layer 0: hadamard codes drift"
    assert rel(logits_gpu.cpu(), logits_cpu) <= 2e-2


def test_prefill_then_graph_decode_equals_longer_prefill(qmodel):
    from qmamba.runtime.cuda_model import CudaBackend

    be = CudaBackend(qmodel)
    ids = rand_ids(3, 20, seed=5)
    logits, st = be.prefill(ids[:, :12])
    for t in range(12, 20):
        logits, st = be.decode(ids[:, t], st)  # bucket 4: padded graph replays
    full, full_st = be.prefill(ids)
    assert rel(logits, full) <= 1e-4
    assert rel(st[0].ssm.cpu(), full_st[0].ssm.cpu()) <= 1e-4
    eager = CudaBackend(qmodel, graphs=False)
    logits_e, st_e = eager.prefill(ids[:, :12])
    for t in range(12, 20):
        logits_e, st_e = eager.decode(ids[:, t], st_e)
    assert torch.equal(logits, logits_e)  # the graph replays exactly what the eager step computes


def test_decode_graph_captures_with_every_fusion_off(qmodel):
    """The separate stages (bench/e2e.py --compare-fusions times them) must be capturable too: no host-to-device
    copy inside the step. The replay equals the eager step with the same ops."""
    from qmamba.runtime.cuda_model import CudaOps, CudaQuantModel, _DecodeGraph

    gpu = CudaQuantModel(qmodel)
    gpu.in_place_ops = CudaOps(gpu.device, in_place_states=True, fuse_conv=False, fuse_hadamard=False,
                               fuse_x_proj_behind=False, fuse_final_norm=False, embedding_kernel=False)
    g = _DecodeGraph(gpu, 1)
    tok = torch.tensor([7])
    states = gpu.init_states(1)
    for st, gs in zip(states, g.states, strict=True):
        st.conv.copy_(gs.conv)
        st.ssm.copy_(gs.ssm)
    eager, _ = gpu(tok.view(1, 1).to(gpu.device), states, in_place=True)
    replayed, _ = g.step(tok, g.states)
    assert torch.equal(replayed, eager[:, -1].float())


def test_in_place_decode_with_fused_conv_and_hadamard(qmodel, monkeypatch):
    """Decode of one sequence in place runs the conv and x_proj's sums behind in_proj (x_proj's epilogue in the state
    update) and HadamardQuant inside out_proj; without the first, the conv inside x_proj (its state shifted in the
    state update); traced (every stage wanted) the separate kernels run. All give the separate kernels' bits, and
    layer 0's conv state (integer stages only) equals the CPU integer path's."""
    from qmamba import cuda as kernels
    from qmamba.runtime.cuda_model import CudaOps, CudaQuantModel, XProjSums

    int8_linear, update_out_proj = kernels.int8_linear, kernels.update_out_proj

    def counting_linear(*a, **kw):
        had_calls[-1] += kw.get("hadamard") is not None
        return int8_linear(*a, **kw)

    def counting_update_out_proj(*a, **kw):
        uop_calls[-1] += 1
        return update_out_proj(*a, **kw)

    monkeypatch.setattr(kernels, "int8_linear", counting_linear)
    monkeypatch.setattr(kernels, "update_out_proj", counting_update_out_proj)

    gpu = CudaQuantModel(qmodel)
    ids = rand_ids(1, 6, seed=11)
    behind_calls, front_calls, had_calls, uop_calls = [], [], [], []

    class Spy(CudaOps):  # counts the calls that took the fused kernels (a silent fallback would pass the rest)
        def in_proj_conv_x_proj(self, *a, **kw):
            out = super().in_proj_conv_x_proj(*a, **kw)
            behind_calls[-1] += isinstance(out[5], XProjSums)
            return out

        def conv_x_proj(self, *a, **kw):
            out = super().conv_x_proj(*a, **kw)
            front_calls[-1] += out[3] is not None
            return out

    variants = {"fused": {}, "conv-in-front": {"fuse_x_proj_behind": False}, "traced": {},
                "separate": {"fuse_conv": False, "fuse_hadamard": False, "fuse_x_proj_behind": False},
                "update-then-out_proj": {"fuse_update_out_proj": False}}
    runs = {}
    for name, kw in variants.items():
        gpu.in_place_ops = Spy(gpu.device, in_place_states=True, **kw)
        for calls in (behind_calls, front_calls, had_calls, uop_calls):
            calls.append(0)
        states, out = gpu.init_states(1), []
        for t in range(ids.shape[1]):
            if name == "traced":
                with trace.trace():
                    logits, _ = gpu(ids[:, t : t + 1], states, in_place=True)
            else:
                logits, _ = gpu(ids[:, t : t + 1], states, in_place=True)
            out.append((logits.clone(), [s.conv.clone() for s in states], [s.ssm.clone() for s in states]))
        runs[name] = out
        assert gpu.in_place_ops._clear_next is None, f"{name}: x_proj's sums were left for no kernel to clear"
        assert all(not acc.any() for acc in gpu.in_place_ops._xp_acc.values()), f"{name}: x_proj's sums not zeroed"
    calls = 6 * qmodel.cfg.n_layer
    assert behind_calls == [calls, 0, 0, 0, calls]
    assert front_calls == [0, calls, calls, 0, 0]  # traced: the conv still runs inside x_proj, its state shifted later
    # the update and out_proj in one cluster kernel; traced: every stage is wanted, so neither fuses
    assert uop_calls == [calls, calls, 0, 0, 0]
    assert had_calls == [0, 0, 0, 0, calls]
    for name in ("conv-in-front", "traced", "separate", "update-then-out_proj"):
        for (la, ca, sa), (lb, cb, sb) in zip(runs["fused"], runs[name], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ca, cb, strict=True)), f"{name}: conv states differ"
            assert all(torch.equal(a, b) for a, b in zip(sa, sb, strict=True)), f"{name}: ssm states differ"
            assert torch.equal(la, lb), f"{name}: logits differ"
    cpu_states = qmodel.init_states(1)
    for t in range(ids.shape[1]):
        _, cpu_states = qmodel(ids[:, t : t + 1], cpu_states)
        assert torch.equal(runs["fused"][t][1][0].cpu(), cpu_states[0].conv), f"step {t}: layer 0 conv state"
    # a step that stops after an in_proj (before its update reads the sums) must not leave them to the next step
    ops = gpu.in_place_ops = CudaOps(gpu.device, in_place_states=True)
    states = gpu.init_states(1)
    lyr = gpu.model.layers[0]
    xz = [(qmodel.cfg.d_inner, lyr.scales["in_proj.x"]), (qmodel.cfg.d_inner, lyr.scales["in_proj.z"])]
    xp = [(qmodel.cfg.dt_rank, lyr.scales["x_proj.dt_lowrank"]), (qmodel.cfg.d_state, lyr.scales["x_proj.B"]),
          (qmodel.cfg.d_state, lyr.scales["x_proj.C"])]
    residual = torch.randn(1, 1, qmodel.cfg.d_model, device=gpu.device)
    ops.in_proj_conv_x_proj(residual, lyr, qmodel.cfg.rms_norm_eps, xz, states[0].conv.clone(), xp)
    assert ops._unread is not None and ops._unread.any()
    states = gpu.init_states(1)
    for t in range(ids.shape[1]):
        logits, _ = gpu(ids[:, t : t + 1], states, in_place=True)
        assert torch.equal(logits, runs["fused"][t][0]), f"step {t} after a stopped step: logits differ"


def test_greedy_generation_matches_the_cpu_backend(qmodel):
    from qmamba.runtime.cuda_model import CudaBackend

    prompts = ["KING:", "To be, or not to be", "O Romeo"]
    params = [SamplingParams(32), SamplingParams(24), SamplingParams(32, stop=("\n",))]
    a = Generator(TorchBackend(qmodel), ByteTokenizer()).generate(prompts, params)
    b = Generator(CudaBackend(qmodel), ByteTokenizer()).generate(prompts, params)
    assert [c.text for c in a] == [c.text for c in b]


def test_server_on_the_gpu_backend_batches_concurrent_streams(qmodel):
    """`qmamba serve --device cuda` path: 12 concurrent greedy streams through CUDA-graph decode steps give
    the CPU backend's texts; the server stays healthy."""
    from concurrent.futures import ThreadPoolExecutor

    for mod in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(mod, reason=f"{mod} is not installed: the server extra is needed for this test")
    import httpx
    from test_server import _read_stream, live_server

    from qmamba.runtime.cuda_model import CudaBackend

    prompts = [f"{w} " for w in ("KING", "QUEEN", "ROMEO", "JULIET", "HAMLET", "LEAR")] * 2
    want = Generator(TorchBackend(qmodel), ByteTokenizer()).generate(prompts, [SamplingParams(16)] * len(prompts))
    with live_server(None, backend=CudaBackend(qmodel), max_queue=64, max_batch=16) as (url, _):
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: _read_stream(url, p, 16)[0], prompts))
        assert got == [c.text for c in want]
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_float_model_on_the_gpu_matches_the_cpu(tiny_model_dir):
    """`qmamba serve --backend torch --device cuda` with a float model: TorchBackend on the GPU, traced (so the
    Hadamard stage runs the reference transform there), prefill and a decode step within float tolerance of the
    CPU's (cuDNN may run the depthwise conv in TF32)."""
    ids = rand_ids(2, 9, seed=3)
    cpu, gpu = TorchBackend(load_model(tiny_model_dir)), TorchBackend(load_model(tiny_model_dir), "cuda")
    with trace.trace() as t_cpu:
        logits_cpu, states_cpu = cpu.prefill(ids)
    with trace.trace() as t_gpu:
        logits_gpu, states_gpu = gpu.prefill(ids)
    assert states_gpu[0].ssm.device.type == "cuda"  # the tracer and the backend hand values back on the CPU
    assert rel(logits_gpu, logits_cpu) <= 2e-3  # the last position's logits
    assert rel(t_gpu.float_dict()["layers.0.hadamard"], t_cpu.float_dict()["layers.0.hadamard"]) <= 2e-3
    nxt = logits_cpu.argmax(-1)
    step_cpu, _ = cpu.decode(nxt, states_cpu)
    step_gpu, _ = gpu.decode(nxt, states_gpu)
    assert rel(step_gpu, step_cpu) <= 2e-3
