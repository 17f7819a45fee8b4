"""onnxruntime helpers: sessions for compiled models and a DDIM sampler loop over a session (``msfp-sample``)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from msfp_compiler.errors import MsfpError

__all__ = ["session_from_model", "open_session", "OrtUNet", "ddim_sample", "save_grid"]


def _options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def session_from_model(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """A session on an in-memory model; one over protobuf's 2 GB limit goes through a temporary .onnx + .data."""
    from .onnx import MAX_PROTO_BYTES, save_atomic, serialized_size

    size = serialized_size(model)
    if size is not None and size <= MAX_PROTO_BYTES:
        return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="msfp_session_") as d:
        path = Path(d) / "model.onnx"
        save_atomic(model, path, external_data_threshold=MAX_PROTO_BYTES)
        return ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])


def open_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise MsfpError(f"{path}: no such ONNX file")
    try:
        return ort.InferenceSession(str(path), _options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise MsfpError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e


class OrtUNet:
    """Calls an ORT session with the compiled model's convention: (sample, timestep[, cond]) -> noise_pred."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        shape = session.get_inputs()[0].shape
        self.channels, self.size = int(shape[1]), int(shape[2])
        self.cond = self.inputs[2] if len(self.inputs) > 2 else None
        self.cond_shape = session.get_inputs()[2].shape if self.cond else None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {"sample": sample.float().numpy(), "timestep": timestep.long().numpy()}
        if self.cond:
            feeds[self.cond] = cond.numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0])


def ddim_sample(unet, n: int, steps: int = 50, seed: int = 0, cond: torch.Tensor | None = None,
                scheduler_config: dict | None = None, batch_size: int = 64, channels: int | None = None,
                size: int | None = None, progress: bool | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM sampling with any callable unet(sample, t[, cond]); the same seed gives the same initial noise."""
    from diffusers import DDIMScheduler

    channels = channels or unet.channels
    size = size or unet.size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, size, size, generator=g)
    out = []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=n * steps, desc="sampling", disable=not show, leave=False, unit="evals")
    for i in range(0, n, batch_size):
        sched = (DDIMScheduler.from_config(scheduler_config) if scheduler_config else
                 DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
        sched.set_timesteps(steps)
        x = noise[i:i + batch_size] * sched.init_noise_sigma
        c = cond[i:i + batch_size] if cond is not None else None
        for t in sched.timesteps:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.int64)
            eps = unet(sched.scale_model_input(x, t), tt, c) if c is not None else unet(sched.scale_model_input(x, t), tt)
            x = sched.step(eps, t, x, eta=eta).prev_sample
            bar.update(x.shape[0])
        out.append(x)
    bar.close()
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Save [N, C, H, W] images in [-1, 1] as one PNG grid (written atomically)."""
    from PIL import Image

    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    # Mid-grey separators keep black digit backgrounds apart.
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 128, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = imgs[k]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    if not path.parent.is_dir():
        raise MsfpError(f"{path}: output folder does not exist")
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
