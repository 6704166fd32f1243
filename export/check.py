"""`qmamba check`: a backend against the PyTorch reference, stage by stage, with Polygraphy.

Backends are small runners behind one interface (as Polygraphy's): `onnxruntime` runs an exported
.onnx file; `tensorrt` runs a built engine directory through Polygraphy's TrtRunner with our plugin
library loaded through the registry. Both outputs are stored as Polygraphy RunResults and compared
with `Comparator.compare_accuracy` (integer tensors exactly), then summarized per layer and stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from qmamba import trace
from qmamba.compare import metrics, write_report
from qmamba.errors import UserError
from qmamba.model.checkpoint import atomic_dir
from qmamba.ops.ref import embedding_lookup


class Backend(Protocol):
    name: str

    def input_names(self) -> list[str]: ...

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, path: Path) -> None:
        from export.ort import session

        self.path = path
        self.sess = session(path)

    def input_names(self) -> list[str]:
        return [i.name for i in self.sess.get_inputs()]

    def run(self, feed):
        names = [o.name for o in self.sess.get_outputs()]
        return dict(zip(names, self.sess.run(names, feed), strict=True))


class TensorRTBackend:
    """A `qmamba build-engine` directory run by Polygraphy's TrtRunner (plugins via the registry)."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path, graph: str = "prefill", plugins: Path | None = None) -> None:
        from polygraphy.backend.trt import TrtRunner

        from engines.build import load_engine

        self.engine, self.meta = load_engine(engine_dir, graph, plugins)
        self.runner = TrtRunner(self.engine)

    def input_names(self) -> list[str]:
        e = self.engine
        import tensorrt as trt

        return [e.get_tensor_name(i) for i in range(e.num_io_tensors)
                if e.get_tensor_mode(e.get_tensor_name(i)) == trt.TensorIOMode.INPUT]

    def run(self, feed):
        with self.runner:
            return {k: np.asarray(v) for k, v in self.runner.infer(feed).items()}


@dataclasses.dataclass(frozen=True)
class Tolerance:
    int_atol: float
    float_atol: float
    float_rtol: float


def tolerance(backend: str, recipe: str) -> Tolerance:
    # onnxruntime follows the spec op for op: integers exact, floats to float32 rounding.
    # fp16: both sides round linears to fp16 at different points. tensorrt: the CUDA scan uses
    # hardware exp2, so int8 tensors downstream of a scan may move by one code (spec "Exactness").
    if backend == "tensorrt":
        return Tolerance(1, 1e-2, 1e-2)
    if recipe == "fp16":
        return Tolerance(0, 2e-2, 2e-2)
    return Tolerance(0, 1e-4, 1e-4)


def _export_meta(model: Path) -> dict:
    for p in (model.parent / "export.json", model / "engine.json"):
        if p.is_file():
            meta = json.loads(p.read_text())
            return meta.get("export", meta)
    raise UserError(f"no export.json next to {model}: check takes a file written by qmamba export")


def make_inputs(meta: dict, batch: int, seq_len: int, seed: int, input_ids: Path | None) -> torch.Tensor:
    vocab = meta["model_config"]["vocab_size"]
    if input_ids is not None:
        if not input_ids.is_file():
            raise UserError(f"--input-ids {input_ids} not found")
        arr = np.load(input_ids, allow_pickle=False)
        if arr.dtype.kind not in "iu":
            raise UserError(f"--input-ids has dtype {arr.dtype}; token ids must be integers (int64)")
        if arr.ndim != 2:
            raise UserError(f"--input-ids has rank {arr.ndim} (shape {arr.shape}); expected [batch, length]")
        if arr.min() < 0 or arr.max() >= vocab:
            raise UserError(f"--input-ids has ids outside [0, {vocab})")
        ids = torch.from_numpy(arr.astype(np.int64))
    else:
        if batch < 1 or seq_len < 1:
            raise UserError(f"--batch {batch} and --seq-len {seq_len} must both be positive")
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    b, l = ids.shape
    if not 1 <= b <= meta["max_batch"]:
        raise UserError(f"batch {b} is outside what was exported (1..{meta['max_batch']})")
    if not 1 <= l <= meta["max_len"]:
        raise UserError(f"length {l} is outside what was exported (1..{meta['max_len']})")
    return ids


def reference_run(ref_dir: Path, meta: dict, ids: torch.Tensor, graph: str) -> tuple[dict, dict]:
    """(feed for the backend, reference outputs by name) from the PyTorch reference."""
    from qmamba.model.checkpoint import load_model
    from qmamba.quant.checkpoint import is_qdir, load_quantized
    from qmamba.quant.loading import source_model_dir

    if meta["recipe"] == "fp16":
        src = source_model_dir(ref_dir) if is_qdir(ref_dir) else ref_dir
        model = load_model(src, torch.float16)
    else:
        if not is_qdir(ref_dir):
            raise UserError(f"--reference {ref_dir} is not a quantized checkpoint (QDIR)")
        model = load_quantized(ref_dir)
        if model.recipe.name != meta["recipe"]:
            raise UserError(f"--reference holds recipe {model.recipe.name}; the ONNX file is {meta['recipe']}")
    if model.cfg.to_hf() != meta["model_config"]:
        raise UserError("--reference is a different model than the one exported (config differs)")
    with torch.no_grad(), trace.trace() as tr:
        _, states = model(ids)
    out: dict[str, np.ndarray] = {}
    for name in tr.names:
        v = tr.get(name)
        out[name] = v.codes.numpy() if isinstance(v, trace.QTensor) else v.numpy()
    if graph == "block":
        first, last = meta["layers"][0], meta["layers"][-1]
        if first == 0:
            if hasattr(model, "embedding"):
                resid = embedding_lookup(ids, model.embedding.weight_q, model.embedding.weight_scale).numpy()
            else:
                resid = torch.nn.functional.embedding(ids, model.backbone.embeddings.weight.detach()).float().numpy()
        else:
            resid = out[f"layers.{first - 1}.block"]
        keep = {k: v for k, v in out.items() if k.startswith("layers.") and
                first <= int(k.split(".")[1]) <= last}
        keep["output"] = out[f"layers.{last}.block"]
        return {"residual": resid}, keep
    for i, st in enumerate(states):
        out[f"conv_state.{i}"] = st.conv.numpy()
        out[f"ssm_state.{i}"] = st.ssm.numpy()
    return {"input_ids": ids.numpy()}, out


def _order_key(name: str) -> tuple:
    from qmamba.compare import _order

    return _order(name)


def check(model: Path, reference: Path, backend: str, batch: int = 2, seq_len: int = 64, seed: int = 0,
          input_ids: Path | None = None, out_dir: Path = Path("out/check"), plugins: Path | None = None) -> int:
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our table replaces Polygraphy's per-output report

    if not model.exists():
        raise UserError(f"{model} does not exist")
    meta = _export_meta(model)
    graph = "block" if meta.get("layers") else "prefill"
    ids = make_inputs(meta, batch, seq_len, seed, input_ids)
    if backend == "onnxruntime":
        if model.suffix != ".onnx":
            raise UserError(f"the onnxruntime backend takes an .onnx file, got {model}")
        be: Backend = OnnxRuntimeBackend(model)
    elif backend == "tensorrt":
        be = TensorRTBackend(model if model.is_dir() else model.parent, graph, plugins)
    else:
        raise UserError(f"unknown backend {backend!r}: choose onnxruntime or tensorrt")
    feed, ref = reference_run(reference, meta, ids, graph)
    missing = [n for n in feed if n not in be.input_names()]
    if missing:
        raise UserError(f"{model} has no input {missing[0]!r}; it expects {be.input_names()}")
    unfed = [n for n in be.input_names() if n not in feed]
    if unfed:
        raise UserError(f"{model} also takes {unfed}, which a {graph} check does not feed: check runs the prefill "
                        "graph (prefill.onnx) or a block graph, not decode.onnx")
    got = be.run(feed)
    names = sorted((set(ref) & set(got)) - {"logits"}, key=_order_key) + (["logits"] if "logits" in got else [])
    if not any(n.startswith("layers.") for n in names):
        raise UserError(f"{model} exposes no stage outputs: export it with --stages")
    tol = tolerance(be.name, meta["recipe"])
    atol, rtol = {}, {}
    for n in names:
        if got[n].dtype != ref[n].dtype and not (got[n].dtype.kind == "f" and ref[n].dtype.kind == "f"):
            raise UserError(f"output {n}: backend dtype {got[n].dtype} != reference dtype {ref[n].dtype}")
        integer = ref[n].dtype.kind in "iu"
        atol[n] = tol.int_atol if integer else tol.float_atol
        rtol[n] = 0.0 if integer else tol.float_rtol
    results = RunResults()
    ref = {n: np.ascontiguousarray(ref[n]) for n in names}
    got = {n: np.ascontiguousarray(got[n].astype(ref[n].dtype, copy=False)) for n in names}
    results.append(("pytorch", [IterationResult(dict(ref), runner_name="pytorch")]))
    results.append((be.name, [IterationResult(dict(got), runner_name=be.name)]))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    try:
        from polygraphy.comparator import SimpleCompareFunc

        func = SimpleCompareFunc(atol=atol, rtol=rtol, check_shapes=True)
    except ImportError:  # Polygraphy < 0.50
        func = CompareFunc.simple(atol=atol, rtol=rtol, check_shapes=True)
    accuracy = Comparator.compare_accuracy(results, compare_func=func)
    passed = {}
    # Polygraphy >= 0.50 returns AccuracyResults (one AccuracyResult per compare_func); older, one AccuracyResult
    results_list = list(accuracy) if hasattr(accuracy, "output_names") and not hasattr(accuracy, "items") \
        else [accuracy]
    for acc in results_list:
        for _pair, iters in acc.items():
            for it in iters:
                for name, res in it.items():
                    passed[name] = bool(res)
    rows = [metrics(n, torch.from_numpy(ref[n].astype(np.float64)), torch.from_numpy(got[n].astype(np.float64)))
            for n in names]
    failed = [r for r in rows if not passed[r.name]]
    # every file is written beside out_dir first and moved in only when all are complete: a failure (a full disk)
    # leaves the previous report, not half of a new one; other files in out_dir are left alone
    tmp = atomic_dir(out_dir)
    try:
        save_json([feed], tmp / "inputs.json")
        ref_only = RunResults()
        ref_only.append(results[0])
        ref_only.save(str(tmp / "reference_outputs.json"))
        results.save(str(tmp / "run_results.json"))
        if hasattr(accuracy, "save"):
            accuracy.save(str(tmp / "accuracy.json"))
        write_report(rows, tmp, f"{be.name} vs PyTorch ({meta['recipe']})",
                     {"backend": be.name, "passed": {k: v for k, v in passed.items()},
                      "first_failure": failed[0].name if failed else None,
                      "tolerance": dataclasses.asdict(tol)})
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    head = f"{'layer':>5}  {'stage':<20} {'dtype':<7} {'pass':<4} {'rel L2':>10} {'max abs':>10} {'SQNR dB':>8}"
    print(f"{be.name} vs PyTorch on {model} (recipe {meta['recipe']}, {graph} graph, input {tuple(ids.shape)})")
    print(head)
    print("-" * len(head))
    for r in rows:
        sq = "inf" if np.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}"
        layer = "" if r.layer is None else str(r.layer)
        print(f"{layer:>5}  {r.stage:<20} {str(ref[r.name].dtype):<7} {'ok' if passed[r.name] else 'FAIL':<4} "
              f"{r.rel_l2:>10.3e} {r.max_abs:>10.3e} {sq:>8}")
    int_names = [n for n in names if ref[n].dtype.kind in "iu"]
    cmd = ["polygraphy", "run", str(model), "--onnxrt" if be.name == "onnxruntime" else "--trt",
           "--load-inputs", str(out_dir / "inputs.json"), "--load-outputs", str(out_dir / "reference_outputs.json"),
           "--atol", str(tol.float_atol), "--rtol", str(tol.float_rtol)]
    if tol.int_atol != 0 or tol.float_atol + tol.float_rtol * 128 >= 1:
        # per-output tolerances where a global one would not keep integer outputs exact enough
        cmd += ["--atol", *[f"{n}:{tol.int_atol}" for n in int_names], "--rtol", *[f"{n}:0" for n in int_names]]
    # else: with |code| <= 128 a global atol + rtol * 128 < 1 already rejects any integer mismatch
    print("\nreproduce with the stock Polygraphy CLI:")
    print("  " + shlex.join(cmd))
    if be.name == "onnxruntime":
        print("  (on x86 CPUs without VNNI, ONNX Runtime's default int8 QDQ fusion saturates; qmamba disables it "
              "with session.disable_quant_qdq=1 — see export/ort.py)")
    print(f"wrote {out_dir}/run_results.json, compare.json, compare.png")
    if failed:
        print(f"FAILED: first failing stage: {failed[0].name} (rel L2 {failed[0].rel_l2:.3e}); "
              f"{len(failed)} of {len(rows)} outputs out of tolerance")
        return 1
    print(f"PASSED: {len(rows)} outputs within tolerance ({len(int_names)} integer outputs identical"
          f"{'' if tol.int_atol == 0 else ' within one code'})")
    return 0
