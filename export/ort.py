"""onnxruntime helpers: sessions for compiled models and DDIM sampling over a session (``msfp-sample``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

import msfp_compiler.ops  # noqa: F401  (registers torch.ops.msfp.*, used to decode packed weights)
from msfp_compiler.errors import MsfpError
from msfp_compiler.sampling import make_scheduler, sample
from msfp_compiler.progress import Progress

__all__ = ["session_options", "predecode_weights", "session_from_model", "open_session", "OrtUNet", "ddim_sample",
           "save_grid"]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The options open_session and OrtUNet use when none are given; a start for callers that add their own."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT's memory pattern allocates one block for a run's intermediates at the second run, on top of the arena
    # chunks the first run left: SD1.5 plain sessions grow 1699 -> 2450 MB (W4A4) and 3801 -> 4202 MB (FP32) there.
    # Without it the arena reuses the first run's chunks: no growth, no page faults, the same speed (CIFAR b4 and
    # SD1.5, 1 thread; tools/bench_ort.py memory probes "no_mem_pattern" vs "plain").
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
    return so


def _packed_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """DequantizeFP4Packed nodes whose inputs are all initializers (what ORT would constant-fold)."""
    from .msfp_ops import MSFP_DOMAIN

    consts = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.domain == MSFP_DOMAIN and n.op_type == "DequantizeFP4Packed"
            and all(i in consts for i in n.input)]


def predecode_weights(model: onnx.ModelProto, store: Callable[[np.ndarray], tuple[str, int]]) -> onnx.ModelProto:
    """Decode the packed 4-bit weights here, one layer at a time, instead of in ORT's constant folding.

    ORT folds ``DequantizeFP4Packed`` at session start but keeps every intermediate of every layer until the pass
    ends (opening the SD1.5 UNet took 16.7 GB and 58 s that way). Here each constant DequantizeFP4Packed node becomes
    an external-data initializer: its float32 value (``torch.ops.msfp.dequantize_packed``, bit-identical to the
    function body) goes to ``store(array) -> (location, offset)`` as soon as it is decoded. Returns the rewritten copy
    (the caller's model is unchanged); a model without such nodes comes back as is.
    """
    from .msfp_ops import all_nodes

    if not _packed_nodes(model.graph):
        return model
    head = onnx.ModelProto()
    head.CopyFrom(model)
    g = head.graph
    inits = {t.name: t for t in g.initializer}
    decoded: set[str] = set()
    for n in _packed_nodes(g):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        packed, scale = (torch.from_numpy(onnx.numpy_helper.to_array(inits[i]).copy()) for i in n.input)
        w = torch.ops.msfp.dequantize_packed(packed, scale, attrs["format"].decode(), list(attrs["shape"])).numpy()
        location, offset = store(w)
        t = g.initializer.add()
        t.name, t.data_type, t.data_location = n.output[0], onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
        t.dims.extend(w.shape)
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(w.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        decoded.add(n.output[0])
    keep = [n for n in g.node if n.output[0] not in decoded]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in all_nodes(g) for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return head


def session_from_model(model: onnx.ModelProto, threads: int | None = None, *, predecode: bool = True,
                       options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session on an in-memory model.

    With ``predecode`` the packed weights are decoded before ORT sees them (``predecode_weights``) into a temporary
    external-data file that ORT maps instead of copying: the SD1.5 UNet opens at about the memory of its FP32 ONNX.
    A model over protobuf's 2 GB limit also goes through a temporary .onnx + .data.
    """
    from .onnx import MAX_PROTO_BYTES, save_atomic, serialized_size

    so = options or session_options(threads)
    size = serialized_size(model)
    predecode = predecode and size is not None and bool(_packed_nodes(model.graph))
    if size is not None and size <= MAX_PROTO_BYTES and not predecode:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # The files may go as soon as the session exists: ORT has read or mapped them (a mapping outlives the unlink).
    with tempfile.TemporaryDirectory(prefix="msfp_session_", ignore_cleanup_errors=True) as d:
        path = Path(d) / "model.onnx"
        if predecode:
            try:
                with open(Path(d) / "weights.data", "wb") as f:
                    def store(a: np.ndarray) -> tuple[str, int]:
                        f.write(b"\0" * (-f.tell() % 4096))  # page-aligned, so ORT can map each tensor
                        offset = f.tell()
                        f.write(a.tobytes())
                        return "weights.data", offset

                    model = predecode_weights(model, store)
            except OSError as e:
                raise MsfpError(f"cannot write the decoded weights to {d} ({e.strerror or e}); point TMPDIR at a "
                                "folder with room for the float32 weights") from e
        save_atomic(model, path, external_data_threshold=MAX_PROTO_BYTES)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def open_session(path: str | Path, threads: int | None = None, *, predecode: bool = True,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session on an ONNX file; a compiled model's packed weights are decoded before ORT sees them."""
    path = Path(path)
    if not path.is_file():
        raise MsfpError(f"{path}: no such ONNX file")
    try:
        if predecode:
            model = onnx.load(str(path), load_external_data=False)
            if _packed_nodes(model.graph):
                onnx.load_external_data_for_model(model, str(path.parent))  # read once, not parsed twice
                return session_from_model(model, threads, options=options)
        return ort.InferenceSession(str(path), options or session_options(threads), providers=["CPUExecutionProvider"])
    except MsfpError as e:
        raise MsfpError(f"{path}: {e}") from e
    except Exception as e:  # ORT and onnx raise their own exception types (Fail, InvalidGraph, DecodeError, ...)
        raise MsfpError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from e


CONFIG_KEY = "diffusers_config"  # ONNX metadata_props key: the UNet's diffusers config (JSON), set at lowering


class OrtUNet:
    """An onnxruntime session of a compiled (or ``--scheme fp32``) UNet with the diffusers UNet interface.

    ``config``, ``dtype``, ``device`` and ``__call__(sample, timestep, encoder_hidden_states=None, class_labels=None,
    return_dict=True, **ignored)`` returning ``UNet2DOutput`` / ``UNet2DConditionOutput`` (or a 1-tuple), so it
    replaces the torch UNet of a diffusers pipeline: ``DDIMPipeline(unet=OrtUNet(path), scheduler=...)``,
    ``StableDiffusionPipeline(..., unet=OrtUNet(path), ...)``. A scalar timestep is broadcast to the batch, as the
    torch UNet does. ``eps(sample, timestep[, cond])`` is the compiler's own convention (a tensor back).

    ``config`` defaults to the diffusers config stored in the ONNX metadata at lowering (``diffusers_config``).
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, model: "ort.InferenceSession | str | Path", config: dict | None = None,
                 threads: int | None = None):
        from diffusers.configuration_utils import FrozenDict

        if isinstance(model, ort.InferenceSession):
            self.session = model
        else:
            self.session = open_session(model, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if config is None and CONFIG_KEY in meta:
            config = json.loads(meta[CONFIG_KEY])
        ins = self.session.get_inputs()
        self.inputs = [i.name for i in ins]
        shape = ins[0].shape
        self.channels, self.size = int(shape[1]), int(shape[2])
        self.cond = self.inputs[2] if len(self.inputs) > 2 else None
        self.cond_shape = ins[2].shape if self.cond else None
        config = dict(config or {"in_channels": self.channels, "out_channels": self.channels,
                                 "sample_size": self.size})
        self.config = FrozenDict(config)

    @property
    def in_channels(self) -> int:
        return self.channels

    def eps(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The model output for (sample, timestep[, conditioning]) as a float32 CPU tensor."""
        sample = torch.as_tensor(sample)
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() == 1 and sample.shape[0] != 1:
            t = t.expand(sample.shape[0])
        feeds = {"sample": sample.detach().float().cpu().numpy(),
                 "timestep": t.detach().cpu().round().long().numpy()}
        if self.cond:
            if cond is None:
                raise MsfpError(f"this model needs {self.cond}")
            c = torch.as_tensor(cond).detach().cpu()
            feeds[self.cond] = c.long().numpy() if self.cond == "class_labels" else c.float().numpy()
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                 class_labels: torch.Tensor | None = None, return_dict: bool = True, **ignored):
        """The diffusers UNet call; keyword arguments an exported UNet cannot take (timestep_cond,
        cross_attention_kwargs, added_cond_kwargs, ...) must be None."""
        extra = [k for k, v in ignored.items() if v is not None]
        if extra:
            raise MsfpError(f"OrtUNet: the ONNX model takes no {', '.join(sorted(extra))}")
        cond = class_labels if self.cond == "class_labels" else encoder_hidden_states
        out = self.eps(sample, timestep, cond).to(torch.as_tensor(sample).dtype)
        if not return_dict:
            return (out,)
        if self.cond == "encoder_hidden_states":
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


def ddim_sample(unet, n: int, steps: int = 50, seed: int = 0, cond: torch.Tensor | None = None,
                scheduler_config: dict | None = None, batch_size: int = 64, channels: int | None = None,
                size: int | None = None, progress: bool | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM sampling with any callable unet(sample, t[, cond]); the same seed gives the same initial noise."""
    f = unet.eps if isinstance(unet, OrtUNet) else unet
    channels = channels or unet.channels
    size = size or unet.size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, channels, size, size, generator=g)
    out = []
    bar = Progress(n * steps, "sampling", progress, unit="evals")
    for i in range(0, n, batch_size):
        x = noise[i:i + batch_size]
        c = cond[i:i + batch_size] if cond is not None else None
        eps_fn = (lambda xt, tt: f(xt, tt, c)) if c is not None else f  # noqa: E731
        out.append(sample(eps_fn, x, make_scheduler("ddim", scheduler_config), steps, eta,
                          on_step=lambda b=x.shape[0]: bar.update(b)))
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
