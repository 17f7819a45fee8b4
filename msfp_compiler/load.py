"""Safe loading of diffusers UNets from a model folder, a .safetensors file + config, or a .pt checkpoint dict.

``.pt`` files are read with ``torch.load(weights_only=True)`` and must hold {"config": dict, "state_dict": ...}
(``save_checkpoint`` writes one). A pickled nn.Module is accepted only with ``trust_pickle=True``, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MsfpError

__all__ = ["LoadedModel", "load_model", "save_checkpoint", "model_from_config"]

_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class LoadedModel:
    unet: torch.nn.Module
    source: Path
    scheduler_config: dict | None = None
    class_embedding: torch.Tensor | None = None  # [num_classes, D] rows fed as encoder_hidden_states


def model_from_config(config: dict, where: str = "config") -> torch.nn.Module:
    """Build an (untrained) diffusers UNet from its config dict; the class comes from '_class_name'."""
    import diffusers

    name = config.get("_class_name") or ("UNet2DConditionModel" if config.get("cross_attention_dim") else "UNet2DModel")
    if name not in _CLASSES:
        raise MsfpError(f"{where}: unsupported model class {name!r} (expected {' or '.join(_CLASSES)})")
    cls = getattr(diffusers, name)
    try:
        return cls.from_config({k: v for k, v in config.items()})
    except Exception as e:
        raise MsfpError(f"{where}: cannot build {name} from config: {str(e).splitlines()[0]}") from e


def _load_state(unet: torch.nn.Module, state: dict, where: str) -> None:
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise MsfpError(f"{where}: weights do not match the config: {line}") from e
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise MsfpError(f"{where}: weights do not match the config ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys; first {what})")
    for k, v in unet.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise MsfpError(f"{where}: weight {k} contains NaN or Inf")


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MsfpError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(cfg, dict):
        raise MsfpError(f"{path}: config must be a JSON object")
    return cfg


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise MsfpError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e


def _load_folder(folder: Path) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MsfpError(f"{folder}: not a diffusers model folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    weights = [w for w in weights if w.name != "class_embedding.safetensors"]
    if not weights:
        raise MsfpError(f"{folder}: no .safetensors weights next to config.json")
    unet = model_from_config(_read_json(cfg_path), str(cfg_path))
    _load_state(unet, _read_safetensors(weights[0]), str(weights[0]))
    sched = folder / "scheduler_config.json"
    if not sched.is_file():
        sched = folder / "scheduler" / "scheduler_config.json"
    emb = None
    if (folder / "class_embedding.safetensors").is_file():
        emb = _read_safetensors(folder / "class_embedding.safetensors").get("weight")
    return LoadedModel(unet, folder, _read_json(sched) if sched.is_file() else None, emb)


def load_model(path: str | Path, config: str | Path | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a UNet from a folder, a .safetensors (+ config JSON) or a .pt checkpoint; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise MsfpError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        if config is None:
            raise MsfpError(f"{path}: a .safetensors model needs load_model.config (its config JSON)")
        unet = model_from_config(_read_json(Path(config)), str(config))
        _load_state(unet, _read_safetensors(path), str(path))
        return LoadedModel(unet, path)
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_pt(path, trust_pickle)
    raise MsfpError(f"{path}: unknown model kind (expected a diffusers folder, .safetensors or .pt)")


def _load_pt(path: Path, trust_pickle: bool) -> LoadedModel:
    corrupt = f"{path}: not a readable torch checkpoint (corrupt or truncated?)"
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the class it refused ("Unsupported global"); garbage fails it too,
        # with other messages, and must never be met with advice to unpickle it.
        if "Unsupported global" not in str(e):
            raise MsfpError(corrupt) from e
        if not trust_pickle:
            raise MsfpError(f"{path}: holds pickled objects beyond tensors and dicts; set load_model.trust_pickle "
                            "only if you trust this file (unpickling runs code)") from e
        raise MsfpError(f"{path}: cannot unpickle ({str(e).splitlines()[0]})") from e
    except Exception as e:  # garbage makes the unpickler raise anything: IndexError, KeyError, UnicodeDecodeError...
        raise MsfpError(corrupt) from e
    if isinstance(obj, torch.nn.Module):
        if not hasattr(obj, "config"):
            raise MsfpError(f"{path}: pickled {type(obj).__name__} is not a diffusers UNet")
        return LoadedModel(obj, path)
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise MsfpError(f"{path}: expected a checkpoint dict with 'config' and 'state_dict' (see save_checkpoint)")
    cfg = obj["config"]
    unet = model_from_config(dict(cfg), str(path))
    _load_state(unet, obj["state_dict"], str(path))
    emb = obj.get("class_embedding")
    return LoadedModel(unet, path, obj.get("scheduler_config"), emb)


def save_checkpoint(unet: torch.nn.Module, path: str | Path, scheduler_config: dict | None = None,
                    class_embedding: torch.Tensor | None = None) -> Path:
    """Write {"config", "state_dict"[, "scheduler_config", "class_embedding"]} readable with weights_only=True."""
    cfg = json.loads(json.dumps(dict(unet.config), default=list))  # plain JSON types only (weights_only-safe)
    obj = {"config": cfg, "state_dict": {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}}
    if scheduler_config:
        obj["scheduler_config"] = json.loads(json.dumps(dict(scheduler_config), default=list))
    if class_embedding is not None:
        obj["class_embedding"] = class_embedding.detach().cpu()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path
