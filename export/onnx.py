"""Lowering of the quantized fx graph to ONNX with custom ``msfp`` ops that stock onnxruntime runs.

torch.onnx.export(dynamo=True) translates ``torch.ops.msfp.*`` through a custom translation table into nodes of
domain ``msfp`` that carry only the format name. A post-processing step then (1) picks each node's function body and
adds the attributes it reads (export/msfp_ops.py), (2) appends one model-local FunctionProto per op name used,
whose body uses standard ops, and (3) imports the msfp opset. ORT inlines the functions, so no plugin is needed; a
native kernel library can still claim the nodes by (domain, op_type) and use the attributes. Models over 256 MB
are saved with external data (``save_atomic``), and those over 2 GB are checked with it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import onnx
import onnxscript
import torch
import torch.fx as fx
from onnx import TensorProto, helper
from onnxscript import FLOAT, UINT8
from onnxscript import opset18 as op

from msfp_compiler.errors import MsfpError
from msfp_compiler.ops import DEQUANTIZE_PACKED, QUANTIZE, QUANTIZE_FOLDED
from msfp_compiler.talora import SELECT_WEIGHT

from .attention import chunk_attention
from .msfp_ops import (MSFP_DOMAIN, MSFP_VERSION, all_nodes, annotate_msfp_nodes, msfp_functions, quantize_op_type,
                       used_ops)

__all__ = ["MSFP_DOMAIN", "lower_to_onnx", "lower_fp32", "to_integer", "msfp_functions", "annotate_msfp_nodes",
           "save_atomic", "check_model",
           "quantize_op_type"]

TEXT_INPUT = "encoder_hidden_states"
_msfp = onnxscript.values.Opset(MSFP_DOMAIN, MSFP_VERSION)
# The translation functions live in their own opset: the exporter inlines them and leaves the msfp node inside.
_wrap = onnxscript.values.Opset("msfp.translation", 1)


@onnxscript.script(_wrap)
def _quantize_fp(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeFP(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _quantize_int(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeInt(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _dequantize_packed(packed: UINT8, scale: FLOAT, fmt: str, shape: Sequence[int]) -> FLOAT:
    return _msfp.DequantizeFP4Packed(packed, scale, format=fmt, shape=shape)


@onnxscript.script(_wrap)
def _quantize_lut(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeLUT(x, scale, zero_point, format=fmt)


@onnxscript.script(_wrap)
def _quantize_lut_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeLUT(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


@onnxscript.script(_wrap)
def _quantize_fp_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeFP(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


@onnxscript.script(_wrap)
def _quantize_int_folded(x: FLOAT, scale: FLOAT, zero_point: FLOAT, fmt: str) -> FLOAT:
    return _msfp.QuantizeInt(x, scale, zero_point, format=fmt, keep_zero_point=0.0)


_PLAIN = {"QuantizeInt": _quantize_int, "QuantizeFP": _quantize_fp, "QuantizeLUT": _quantize_lut}
_FOLDED = {"QuantizeInt": _quantize_int_folded, "QuantizeFP": _quantize_fp_folded, "QuantizeLUT": _quantize_lut_folded}


def _translate_quantize(x, scale, zero_point, fmt: str):
    return _PLAIN[quantize_op_type(fmt)](x, scale, zero_point, fmt=fmt)


def _translate_quantize_folded(x, scale, zero_point, fmt: str):
    return _FOLDED[quantize_op_type(fmt)](x, scale, zero_point, fmt=fmt)


def _translate_dequantize_packed(packed, scale, fmt: str, shape: Sequence[int]):
    return _dequantize_packed(packed, scale, fmt=fmt, shape=list(shape))


def _translate_select_weight(table, timestep, weights):
    """TALoRA's set choice in standard ops: Squeeze(Gather(Concat(Unsqueeze(W_k)), table[timestep[0:1]]))."""
    zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    k = op.Gather(table, op.Slice(timestep, zero, one), axis=0)
    stacked = op.Concat(*[op.Unsqueeze(w, zero) for w in weights], axis=0)
    return op.Squeeze(op.Gather(stacked, k, axis=0), zero)


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scope names (~2 KB a node: more than packed 4-bit weights)."""
    for n in all_nodes(model.graph):
        del n.metadata_props[:]
        n.doc_string = ""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    for t in model.graph.initializer:
        del t.metadata_props[:]
    del model.metadata_props[:]


def _finalize(model: onnx.ModelProto) -> dict[str, int]:
    _strip_debug_info(model)
    counts = annotate_msfp_nodes(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    keep = [o for o in model.opset_import if o.domain not in (MSFP_DOMAIN, "msfp.translation")]
    del model.opset_import[:]
    model.opset_import.extend(keep + [helper.make_opsetid(MSFP_DOMAIN, MSFP_VERSION)])
    existing = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in msfp_functions(opset, used_ops(model)) if (f.domain, f.name) not in existing)
    model.producer_name, model.producer_version = "msfp-compiler", "0.1.0"
    return counts


def lower_to_onnx(gm: fx.GraphModule, example_args: tuple, input_names: list[str], *,
                  output_name: str = "noise_pred", integer: bool = True, conv_weights: str = "int8",
                  unet_config: dict | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Export the (quantized) GraphModule to an ONNX ModelProto with msfp custom ops and a dynamic batch.

    With ``integer`` (export/integer_kernels.py) packed weights become int8 initializers + DequantizeLinear and
    linears on integer-grid activations run as MatMulInteger; without it the packed weights stay 4-bit
    (DequantizeFP4Packed), which a plain session folds to FP32. ``conv_weights="float32"``: conv weights as FP32
    initializers (faster convs, 4 bytes a weight; see export/integer_kernels.py). ``unet_config`` (the diffusers
    config) is stored as JSON in the model's metadata (``diffusers_config``), where ``OrtUNet`` finds it."""
    table = {
        QUANTIZE: _translate_quantize,
        QUANTIZE_FOLDED: _translate_quantize_folded,
        DEQUANTIZE_PACKED: _translate_dequantize_packed,
        SELECT_WEIGHT: _translate_select_weight,
    }
    batch = torch.export.Dim.AUTO
    dyn = [{0: batch} for _ in example_args]
    example_args = tuple(example_args)
    if TEXT_INPUT in input_names:
        # Any text length, whatever the calibration used: export specializes a size-1 example, so trace with >= 2
        # tokens (the captured graph is symbolic in the length, see capture.py).
        i = input_names.index(TEXT_INPUT)
        cond = example_args[i]
        if cond.shape[1] < 2:
            cond = cond.expand(-1, 2, -1).contiguous()
        example_args = example_args[:i] + (cond,) + example_args[i + 1:]
        dyn[i] = {0: batch, 1: torch.export.Dim.AUTO}
    with torch.no_grad():
        prog = torch.onnx.export(gm, example_args, dynamo=True, custom_translation_table=table,
                                 input_names=input_names, output_names=[output_name], dynamic_shapes=tuple(dyn),
                                 optimize=True, verbose=False, report=False, external_data=False)
    if prog is None:
        raise MsfpError("torch.onnx.export returned no program")
    model = prog.model_proto
    counts = _finalize(model)
    chunked = chunk_attention(model)  # the score tensor at large latents sets the session's memory peak
    if integer:
        counts = to_integer(model, conv_weights)
    if chunked:
        counts["chunked_attention"] = chunked
    # Rename the symbolic batch dim so every input and the output share one readable name.
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
        if vi.name == TEXT_INPUT and len(dims) > 1 and not dims[1].HasField("dim_value"):
            dims[1].dim_param = "text_len"
    if unet_config is not None:
        meta = model.metadata_props.add()
        # diffusers' private keys (``_use_default_values`` is a list in set order, which changes with the hash
        # seed) would make the ONNX bytes differ between processes; from_config does not need them
        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_") or k == "_class_name"}
        meta.key, meta.value = "diffusers_config", json.dumps(config, sort_keys=True, default=list)
    check_model(model)
    return model, counts


def to_integer(model: onnx.ModelProto, conv_weights: str = "int8") -> dict[str, int]:
    """Packed 4-bit weights -> int8 + DequantizeLinear (conv weights: FP32 with ``conv_weights="float32"``),
    linears -> MatMulInteger (export/integer_kernels.py), in place; returns the msfp node counts plus what was
    rewritten."""
    from .integer_kernels import lower_integer

    info = lower_integer(model, conv_weights)
    used = used_ops(model)
    keep = [f for f in model.functions if f.domain != MSFP_DOMAIN or f.name in used]
    del model.functions[:]
    model.functions.extend(keep)
    counts: dict[str, int] = {}
    for n in all_nodes(model.graph):
        if n.domain == MSFP_DOMAIN:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    counts.update({k: v for k, v in (("int8_weights", info.int8_weights), ("integer_matmuls", info.integer_matmuls),
                                     ("integer_convs", info.integer_convs),
                                     ("float32_conv_weights", info.float32_conv_weights)) if v})
    return counts


def lower_fp32(unet: torch.nn.Module, cond_len: int = 1, seed: int = 0) -> onnx.ModelProto:
    """The unquantized diffusers UNet lowered through the same path as compiled models (capture + lower_to_onnx):
    same inputs, output, dynamic batch and text length (``cond_len`` only sizes the example conditioning);
    ``save_atomic`` writes external data above 256 MB. The FP32 baseline every comparison uses
    (``msfp-compile --scheme fp32`` does the same from the CLI)."""
    from msfp_compiler.capture import capture, example_inputs, signature_of

    sig = signature_of(unet, cond_len=cond_len)
    gm, sig = capture(unet.eval().float(), sig)
    model, _ = lower_to_onnx(gm, example_inputs(sig, 2, torch.Generator().manual_seed(seed)), sig.input_names,
                             unet_config=dict(unet.config))
    return model


MAX_PROTO_BYTES = 2**31 - 2**26  # protobuf cannot serialize a message over 2 GB; keep a margin for the graph
# Models over this size are saved with external data, even where protobuf could hold them: onnxruntime then reads
# the weights from the .data file instead of holding a parsed protobuf copy of all of them while the session opens
# (SD1.5 W4A4, plain session, 1 thread: open peak RSS 966 -> 344 MB, open + first run 1735 -> 1700 MB; with FP32
# weights for 5% of the conv weights 1937 -> 1850 MB).
EXTERNAL_DATA_BYTES = 2**28
_ALIGN = 4096  # external tensors start on page boundaries, so ORT can map them


def _copy_fields(dst, src, skip: tuple[str, ...] = ()) -> None:
    """Shallow-structured copy of a protobuf message's set fields except `skip` (which stays empty in dst)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    return onnx.numpy_helper.to_array(t).tobytes()  # typed fields (float_data, ...) -> little-endian raw bytes


def _externalized(model: onnx.ModelProto, write, min_bytes: int) -> onnx.ModelProto:
    """A copy of `model` whose top-level initializers of at least `min_bytes` are ONNX external-data references.

    ``write(data: bytes) -> (location, offset)`` stores one tensor. The caller's model is not modified, and no
    tensor is copied except the one being written: mutating the model in place (what onnx.save_model with
    save_as_external_data does: it clears raw_data) would destroy the caller's model, and protobuf arenas do not
    give cleared memory back anyway.
    """
    head = onnx.ModelProto()
    _copy_fields(head, model, skip=("graph",))
    _copy_fields(head.graph, model.graph, skip=("initializer",))
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.ByteSize() < min_bytes:
            head.graph.initializer.add().CopyFrom(t)
            continue
        data = _tensor_bytes(t)
        location, offset = write(data)
        ref = head.graph.initializer.add()
        _copy_fields(ref, t, skip=("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                                   "double_data", "uint64_data", "external_data", "data_location"))
        ref.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            e = ref.external_data.add()
            e.key, e.value = k, v
    return head


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model, also for models over 2 GB (checked with their large tensors left out)."""
    if _can_size(model) and model.ByteSize() <= MAX_PROTO_BYTES:
        onnx.checker.check_model(model, full_check=False)
        return
    # Check the graph with its large tensors as external references to an empty placeholder file: the checker
    # wants the file to exist, not the bytes, so nothing of the weights is copied or written.
    with tempfile.TemporaryDirectory(prefix="msfp_check_") as d:
        (Path(d) / "tensors.data").touch()
        head = _externalized(model, lambda data: ("tensors.data", 0), 1024)
        (Path(d) / "model.onnx").write_bytes(head.SerializeToString())
        onnx.checker.check_model(str(Path(d) / "model.onnx"), full_check=False)


def save_atomic(model: onnx.ModelProto, path: Path, external_data_threshold: int = EXTERNAL_DATA_BYTES,
                external_min_bytes: int = 1024) -> None:
    """Write model to path atomically (temp file + rename; no partial file on error or interrupt).

    Models over `external_data_threshold` bytes (default 256 MB: see EXTERNAL_DATA_BYTES; protobuf cannot
    serialize more than 2 GB) keep every initializer
    of at least `external_min_bytes` in ``<name>.data`` next to the .onnx (ONNX external data, page-aligned
    offsets), which onnxruntime loads from the .onnx path. The data file is written to a temp name and renamed
    before the .onnx that refers to it; a stale ``<name>.data`` from an earlier save is never appended to, and is
    removed when the new model needs none. The caller's ModelProto is left unchanged.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MsfpError(f"{path}: output folder does not exist")
    big = model.ByteSize() > external_data_threshold if _can_size(model) else True
    data_path = path.with_name(path.name + ".data")
    temps: list[str] = []

    def temp(name: str) -> tuple[int, str]:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
        temps.append(tmp)
        return fd, tmp

    try:
        fd, tmp = temp(path.name)
        with os.fdopen(fd, "wb") as f_onnx:
            if big:
                dfd, tmp_data = temp(data_path.name)
                with os.fdopen(dfd, "wb") as f_data:
                    def write(data: bytes) -> tuple[str, int]:
                        f_data.write(b"\0" * (-f_data.tell() % _ALIGN))
                        offset = f_data.tell()
                        f_data.write(data)
                        return data_path.name, offset

                    head = _externalized(model, write, external_min_bytes)
                f_onnx.write(head.SerializeToString())
            else:
                f_onnx.write(model.SerializeToString())
        mode = file_mode()  # mkstemp makes 0600 files; an output gets what open() would give it
        if big:
            os.chmod(tmp_data, mode)
            os.replace(tmp_data, data_path)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if not big and data_path.exists():
            data_path.unlink()  # left by an earlier, larger model at this path; the new .onnx does not use it
    except PermissionError as e:
        raise MsfpError(f"{path}: cannot write ({e.strerror})") from e
    except OSError as e:
        raise MsfpError(f"{path}: cannot write ({e.strerror or e})") from e
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)


def file_mode() -> int:
    """0666 minus the process umask: the mode a plain open() gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def serialized_size(model: onnx.ModelProto) -> int | None:
    """Serialized size in bytes, or None where protobuf refuses to size the message (over 2 GB)."""
    try:
        return model.ByteSize()
    except Exception:
        return None


def _can_size(model: onnx.ModelProto) -> bool:
    return serialized_size(model) is not None
