"""Load and save float Mamba checkpoints in the Hugging Face layout (config.json + safetensors).

Also reads mamba_ssm checkpoints (config.json with d_model/n_layer, pytorch_model.bin, names
``backbone.embedding.weight``). Missing or unexpected tensors and shape mismatches are errors that
name the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qmamba.config import MambaConfig
from qmamba.errors import UserError
from qmamba.model.mamba import MambaLM


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable or does not match its config or the model."""


_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file, with a truncated or foreign file reported as a user error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        out: dict[str, torch.Tensor] = {}
        for f in st:
            out.update(read_safetensors(f))
        return out
    binf = model_dir / "pytorch_model.bin"
    if binf.is_file():
        try:
            tensors = torch.load(binf, map_location="cpu", weights_only=True)
        # a corrupt pickle/zip fails with many exception types (EOFError, RuntimeError, IndexError, ...)
        except Exception as e:
            raise CheckpointError(f"{binf} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{binf} holds a {type(tensors).__name__}, not a dict of named tensors")
        return tensors
    raise CheckpointError(f"{model_dir}: no *.safetensors or pytorch_model.bin found")


_JSON_KINDS = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
               int: "a JSON number", float: "a JSON number", type(None): "JSON null"}


def json_kind(value: object) -> str:
    """What a parsed JSON value is ('a JSON array', ...), for error messages."""
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json_object(path: Path, error: type[Exception], what: str = "") -> dict:
    """The JSON object in `path`; `error` naming the file if it is unreadable, not JSON or not an object."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise error(f"{path} holds {json_kind(d)}, expected a JSON object{what}")
    return d


def _load_config(model_dir: Path) -> MambaConfig:
    """MambaConfig.load, with every way config.json can be broken reported with its path."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model directory needs config.json")
    d = read_json_object(path, CheckpointError, " (a Mamba config)")
    try:
        return MambaConfig.from_dict(d)
    # ConfigError is a ValueError; a field of the wrong type fails as KeyError/TypeError/AttributeError
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path}: not a Mamba-1 config ({detail})") from e


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> MambaLM:
    model_dir = Path(model_dir)
    cfg = _load_config(model_dir)
    tensors = {_RENAMES.get(k, k): v for k, v in _read_tensors(model_dir).items()}
    model = MambaLM(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{model_dir}: checkpoint does not match config.json "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{model_dir}: tensor {k} has shape {tuple(tensors[k].shape)}, config implies {tuple(v.shape)}"
            )
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=not cfg.tie_embeddings)
    model.eval()
    return set_precision(model, dtype)


def set_precision(model: MambaLM, dtype: torch.dtype) -> MambaLM:
    """Cast linear weights and the embedding to dtype; A_log, D, dt_bias, conv and norms stay float32."""
    with torch.no_grad():
        model.backbone.embeddings.to(dtype)
        for blk in model.backbone.layers:
            for lin in (blk.mixer.in_proj, blk.mixer.x_proj, blk.mixer.dt_proj, blk.mixer.out_proj):
                lin.weight.data = lin.weight.data.to(dtype)
            blk.mixer.dt_proj.bias.data = blk.mixer.dt_proj.bias.data.float()
        if model.cfg.tie_embeddings:
            model.lm_head.weight = model.backbone.embeddings.weight
        else:
            model.lm_head.to(dtype)
    return model


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which would race with other threads creating files
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give a file the mode open() would (0666 & ~umask).

    safetensors' save_file writes through a 0600 temp file; left so, a server or container running
    as another user could not read the weights next to its 0644 config files.
    """
    path.chmod(0o666 & ~_umask())


def check_out_parent(out_dir: Path) -> None:
    """Refuse an output path below a file (mkdir's own error names the file as 'exists'); commands call it before
    their work, so the mistake costs nothing."""
    for p in out_dir.parents:
        if p.exists():
            if not p.is_dir():
                raise CheckpointError(f"cannot write {out_dir}: {p} is a file, not a directory")
            return


def check_out(out_dir: Path, force: bool) -> None:
    """What every command that writes a directory checks before its work: an existing out_dir is replaced only
    with --force, and out_dir may not lie below a file."""
    if out_dir.exists() and not force:
        raise CheckpointError(f"{out_dir} exists; pass --force to replace it")
    check_out_parent(out_dir)


def atomic_dir(out_dir: Path):
    """A temp dir next to out_dir; call commit(tmp) to rename it into place (no half-written dirs)."""
    check_out_parent(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    return tmp


def commit_dir(tmp: Path, out_dir: Path, overwrite: bool = True) -> None:
    if out_dir.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out_dir} exists")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # --force over a file
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out_dir)


def save_model(model: MambaLM, out_dir: str | Path, extra_files: dict[str, str] | None = None) -> None:
    out_dir = Path(out_dir)
    tmp = atomic_dir(out_dir)
    try:
        sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        if model.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        follow_umask(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
