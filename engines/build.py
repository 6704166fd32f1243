"""TensorRT engine builds for exported qmamba graphs (TensorRT 10.x >= 10.8 and 11.x Python API).

The plugin library is loaded through the plugin registry, the ONNX parser maps the `qmamba` nodes to
our plugins (plugin_namespace/plugin_version attributes), the network is strongly typed (no
weak-typing flags: TensorRT 11 removed them), one optimization profile per graph, a timing cache is
reused across builds, and the plugin library is serialized into the engine where supported.
Every engine gets a metadata json; `load_engine` refuses an engine whose metadata does not match
the TensorRT version, GPU or plugin library in use, with a message that says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from qmamba.errors import UserError
from qmamba.model.checkpoint import check_out, commit_dir

GRAPHS = ("prefill", "decode")


class EngineError(UserError):
    """An engine that cannot be built or loaded here; the message says why."""


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            "TensorRT's Python package is not installed: engine builds and loads need it "
            "(use the docker image, docker/README.md)"
        ) from e
    return trt


@dataclasses.dataclass(frozen=True)
class Profiles:
    batch: tuple[int, int, int] = (1, 1, 8)  # prefill (min, opt, max)
    length: tuple[int, int, int] = (1, 256, 2048)
    decode_batch: tuple[int, int, int] = (1, 8, 64)

    def __post_init__(self) -> None:
        for name in ("batch", "length", "decode_batch"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ValueError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {lo},{opt},{hi}")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU is visible: TensorRT engines need one")
    return torch.cuda.get_device_name()


def _shapes(name: str, dims, graph: str, p: Profiles):
    """(min, opt, max) for one input: dim 0 is the batch, dim 1 of input_ids the length."""
    b = p.batch if graph == "prefill" else p.decode_batch
    out = []
    for k in range(3):
        shape = []
        for i, d in enumerate(dims):
            if d >= 0:
                shape.append(d)
            elif i == 0:
                shape.append(b[k])
            elif name == "input_ids" and i == 1:
                shape.append(p.length[k])
            else:
                raise EngineError(f"input {name} has a dynamic dimension {i} that no profile describes")
        out.append(tuple(shape))
    return out


class _Logger:
    def __init__(self, trt, verbose: bool):
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def check_out_dir(onnx_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse, before any work, an --out that would replace what exists without --force, or the ONNX graphs."""
    src, dst = onnx_dir.resolve(), out_dir.resolve()
    if dst == src or dst in src.parents:
        raise EngineError(f"--out {out_dir} would replace the ONNX directory {onnx_dir} the engines are built from")
    check_out(out_dir, force)


def build_engine(onnx_dir: Path, plugins: Path, out_dir: Path, profiles: Profiles = Profiles(),
                 timing_cache: Path | None = None, verbose: bool = False, force: bool = False) -> dict:
    onnx_dir, plugins, out_dir = Path(onnx_dir), Path(plugins), Path(out_dir)
    check_out_dir(onnx_dir, out_dir, force)
    trt = _trt()
    if not plugins.is_file():
        raise EngineError(f"plugin library {plugins} not found (build trt_plugins first)")
    graphs = [g for g in GRAPHS if (onnx_dir / f"{g}.onnx").is_file()]
    if not graphs:
        raise EngineError(f"{onnx_dir} has no prefill.onnx or decode.onnx (run qmamba export first)")
    logger = _Logger(trt, verbose).logger
    registry = trt.get_plugin_registry()
    if registry.load_library(str(plugins)) is None:
        raise EngineError(f"TensorRT could not load the plugin library {plugins}")
    timing_cache = timing_cache or out_dir.parent / "timing.cache"
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temp dir goes beside it: os.replace stays on one disk
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    meta = {
        "tensorrt_version": trt.__version__,
        "gpu": gpu_name(),
        "plugin_library": str(plugins.resolve()),
        "plugin_sha256": file_sha256(plugins),
        "profiles": dataclasses.asdict(profiles),
        "graphs": {},
    }
    recipe_file = onnx_dir / "export.json"
    if recipe_file.is_file():
        meta["export"] = json.loads(recipe_file.read_text())
    try:
        for g in graphs:
            builder = trt.Builder(logger)
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_dir / f"{g}.onnx")):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise EngineError(f"ONNX parser failed on {g}.onnx: {errs}")
            config = builder.create_builder_config()
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, ignore_mismatch=False)
            if hasattr(config, "plugins_to_serialize"):
                config.plugins_to_serialize = [str(plugins)]
            prof = builder.create_optimization_profile()
            shapes = {}
            for i in range(network.num_inputs):
                t = network.get_input(i)
                mn, opt, mx = _shapes(t.name, tuple(t.shape), g, profiles)
                prof.set_shape(t.name, mn, opt, mx)
                shapes[t.name] = {"min": mn, "opt": opt, "max": mx}
            config.add_optimization_profile(prof)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise EngineError(f"TensorRT failed to build the {g} engine (run with --verbose for the log)")
            (tmp / f"{g}.engine").write_bytes(bytes(blob))
            cache_bytes = bytes(config.get_timing_cache().serialize())
            meta["graphs"][g] = {"inputs": shapes, "sha256": file_sha256(tmp / f"{g}.engine")}
        (tmp / "engine.json").write_text(json.dumps(meta, indent=2) + "\n")
        timing_cache.write_bytes(cache_bytes)
        commit_dir(tmp, out_dir, overwrite=force)  # the old engines go only once the new ones are in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def check_metadata(engine_dir: Path, plugins: Path | None = None) -> dict:
    """The engine's metadata, or EngineError saying which of version / GPU / plugins differs."""
    trt = _trt()
    path = Path(engine_dir) / "engine.json"
    if not path.is_file():
        raise EngineError(f"{engine_dir} has no engine.json: not a qmamba engine directory")
    meta = json.loads(path.read_text())
    problems = []
    if meta.get("tensorrt_version") != trt.__version__:
        problems.append(f"built with TensorRT {meta.get('tensorrt_version')}, this is TensorRT {trt.__version__}")
    here = gpu_name()
    if meta.get("gpu") != here:
        problems.append(f"built for GPU {meta.get('gpu')!r}, this GPU is {here!r}")
    lib = Path(plugins) if plugins else Path(meta.get("plugin_library", ""))
    if not lib.is_file():
        problems.append(f"plugin library {lib} not found")
    elif file_sha256(lib) != meta.get("plugin_sha256"):
        problems.append(f"plugin library {lib} differs from the one the engine was built with (sha256 mismatch)")
    for g, info in meta.get("graphs", {}).items():
        f = Path(engine_dir) / f"{g}.engine"
        if not f.is_file() or file_sha256(f) != info.get("sha256"):
            problems.append(f"{f} is missing or was modified after the build")
    if problems:
        raise EngineError(f"cannot load the engine in {engine_dir}: " + "; ".join(problems) + ". Rebuild it.")
    return meta


def load_engine(engine_dir: Path, graph: str, plugins: Path | None = None):
    """(deserialized ICudaEngine, metadata) after the metadata checks."""
    trt = _trt()
    meta = check_metadata(engine_dir, plugins)
    lib = Path(plugins) if plugins else Path(meta["plugin_library"])
    if trt.get_plugin_registry().load_library(str(lib)) is None:
        raise EngineError(f"TensorRT could not load the plugin library {lib}")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine((Path(engine_dir) / f"{graph}.engine").read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {engine_dir}/{graph}.engine")
    return engine, meta
