"""Shared tiny diffusers UNets and the compiled / per-pass artifacts built from them.

Everything is random-weight and built from configs in code (no downloads). Compiling even a tiny UNet takes tens of
seconds on the 2-core CI machine (torch.export, the format search and the ONNX exporter dominate), so the expensive
artifacts are session-scoped (each worker builds each one at most once, whichever module asks first) and, under
``pytest -n``, the tests sharing one of them run on one worker (``pytest_xdist_make_scheduler`` below). Tests must not
mutate them: ``Stages.fresh`` hands out deep copies (records included) for passes to rewrite.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import msfp_compiler.ops  # noqa: F401  (registers torch.ops.msfp)
from msfp_compiler.calibration import CalibrationSet, collect
from msfp_compiler.sampling import make_scheduler
from msfp_compiler.capture import UNetSignature, capture, signature_of
from msfp_compiler.config import CalibConfig, CompileConfig, QuantConfig
from msfp_compiler.pass_manager import PassResult
from msfp_compiler.record import META_KEY


def pytest_configure(config: pytest.Config) -> None:
    """Without a GPU the Triton kernels run in the interpreter, which a kernel module reads when it is first
    imported: set before collection, so it holds in every worker whichever test imports a kernel module first
    (tests/export/triton_env.py sets it per module, and a tools test importing flash_fp8 before any of those left
    the kernels compiled for a GPU in that worker)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


# Two xdist workers share two (busy) cores: more intra-op threads than cores makes OpenMP spin-wait, which turns a
# 10 ms forward into seconds. One thread each, also for the CLI subprocesses (they inherit the environment).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# 2 calibration samples x 3 DDIM steps, one timestep group per step, 2 held-out samples for ORT checks.
TINY_CALIB = CalibConfig(num_samples=2, num_steps=3, num_groups=3, holdout_samples=2, seed=0)
# The compiled fixtures test lowering, ORT parity and determinism, not search quality, so they use a coarser
# (cheaper) search grid over the full MSFP candidate set. The per-pass stages use the default search.
FAST_QUANT = QuantConfig(clip_ratios=16, zero_points=6, sample_per_group=1024)
FAST_CONFIG = CompileConfig(quant=FAST_QUANT, calib=TINY_CALIB)
STAGE_CONFIG = CompileConfig(calib=TINY_CALIB)


def make_unet2d(seed: int = 0, attention: bool = True) -> torch.nn.Module:
    """UNet2DModel (DDPM-style) with a self-attention down/up block: 8x8, channels (8, 16)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=down, up_block_types=up, norm_num_groups=4,
                       attention_head_dim=8).eval()


def make_unet_min(seed: int = 0) -> torch.nn.Module:
    """The smallest UNet2DModel that still has resnets with SiLU, conv_in/conv_out and a time embedding: one block,
    no attention. For CLI / loading tests, where the ONNX export time (node count) dominates."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
                       add_attention=False).eval()


def make_unet_cond(seed: int = 0) -> torch.nn.Module:
    """UNet2DConditionModel with SD1.5 block types (CrossAttnDown/Down, Up/CrossAttnUp), scaled down: 8x8x4 latents,
    channels (16, 32), cross_attention_dim 16."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=8).eval()


def make_unet_cond_min(seed: int = 0) -> torch.nn.Module:
    """The smallest SD-style UNet2DConditionModel: one CrossAttnDownBlock2D (resnet + transformer with self- and
    cross-attention) and an UpBlock2D, no mid block, 16 channels, cross_attention_dim 16. For tests that compile a
    cross-attention model of their own (text length, in-process determinism), where the export time (node count)
    dominates: about 40% of make_unet_cond's compile."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16,),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("UpBlock2D",), mid_block_type=None, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=8).eval()


def clone_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of a GraphModule *including* the msfp records (fx copies node.meta only shallowly)."""
    new = copy.deepcopy(gm)
    old_nodes = {n.name: n for n in gm.graph.nodes}
    for n in new.graph.nodes:
        rec = old_nodes[n.name].meta.get(META_KEY)
        if rec is not None:
            n.meta[META_KEY] = copy.deepcopy(rec)
    return new


def calibrate(unet: torch.nn.Module, calib: CalibConfig = TINY_CALIB) -> CalibrationSet:
    sig = signature_of(unet)
    return collect(unet, sig, calib.num_samples, calib.num_steps, calib.seed, make_scheduler(calib.scheduler),
                   calib.num_groups, calib.holdout_samples, progress=False)


@dataclass
class Stages:
    """The graph after capture and after each default pass (same passes and order as ``compile``)."""

    unet: torch.nn.Module
    sig: UNetSignature
    calib: CalibrationSet
    config: CompileConfig
    after: dict[str, fx.GraphModule] = field(default_factory=dict)  # "capture", "annotate_sign", ...
    results: dict[str, PassResult] = field(default_factory=dict)  # each pass's info and report

    def fresh(self, stage: str) -> fx.GraphModule:
        return clone_gm(self.after[stage])


def build_stages(unet: torch.nn.Module, config: CompileConfig = STAGE_CONFIG) -> Stages:
    from msfp_compiler.compile import default_passes

    calib = calibrate(unet, config.calib)
    gm, sig = capture(unet)
    st = Stages(unet, sig, calib, config)
    st.after["capture"] = clone_gm(gm)
    for p in default_passes(config, calib):  # what PassManager does, keeping each PassResult
        res = p(gm)
        gm = res.graph_module
        gm.graph.lint()
        gm.recompile()
        st.after[p.name] = clone_gm(gm)
        st.results[p.name] = res
    return st


@pytest.fixture(scope="session")
def unet2d() -> torch.nn.Module:
    return make_unet2d()


@pytest.fixture(scope="session")
def unet_cond() -> torch.nn.Module:
    return make_unet_cond()


@pytest.fixture(scope="session")
def compiled_unet2d(unet2d):
    from msfp_compiler.compile import compile

    return compile(unet2d, FAST_CONFIG, progress=False)


@pytest.fixture(scope="session")
def packed_unet2d(compiled_unet2d):
    """compiled_unet2d lowered with 4-bit packed weights (CompileConfig(integer_kernels=False)): the msfp
    DequantizeFP4Packed body, which a plain session folds to FP32 and open_session predecodes."""
    from msfp_compiler.export.onnx import lower_to_onnx

    cm = compiled_unet2d
    model, counts = lower_to_onnx(cm.graph_module, cm.calibration.batches[0].args, cm.signature.input_names,
                                  integer=False)
    return dataclasses.replace(cm, onnx_model=model, onnx_op_counts=counts)


@pytest.fixture(scope="session")
def compiled_cond(unet_cond):
    from msfp_compiler.compile import compile

    return compile(unet_cond, FAST_CONFIG, progress=False)


# make_unet_cond_min calibrated with 7-token text states (default search, one held-out sample for the check).
TEXT7_CONFIG = CompileConfig(calib=CalibConfig(num_samples=2, num_steps=2, num_groups=1, holdout_samples=1,
                                               text_len=7))


@pytest.fixture(scope="session")
def unet_cond_min() -> torch.nn.Module:
    return make_unet_cond_min()


@pytest.fixture(scope="session")
def compiled_text7(unet_cond_min):
    """make_unet_cond_min compiled with TEXT7_CONFIG (a cross-attention model calibrated with a text length other
    than the default 1)."""
    from msfp_compiler.compile import compile

    return compile(unet_cond_min, TEXT7_CONFIG, progress=False)


@dataclass
class Captured:
    unet: torch.nn.Module
    sig: UNetSignature
    gm: fx.GraphModule  # shared: run it, or rewrite a clone_gm copy

    def fresh(self) -> fx.GraphModule:
        return clone_gm(self.gm)


@pytest.fixture(scope="session")
def captured_cond(unet_cond_min) -> Captured:
    """The smallest SD-style UNet (make_unet_cond_min) captured with its default signature (1-token text)."""
    gm, sig = capture(unet_cond_min)
    return Captured(unet_cond_min, sig, gm)


@pytest.fixture(scope="session")
def fp32_min():
    """The smallest UNet (make_unet_min) and its FP32 ONNX from the library verb ``lower_fp32``: (unet, ModelProto)."""
    from msfp_compiler.export.onnx import lower_fp32

    unet = make_unet_min()
    return unet, lower_fp32(unet)


@pytest.fixture(scope="session")
def stages_unet2d(unet2d) -> Stages:
    return build_stages(unet2d)


@pytest.fixture(params=["unet2d", "cond"])
def compiled(request):
    """Both compiled tiny models (parametrized): UNet2DModel and the small UNet2DConditionModel."""
    return request.getfixturevalue("compiled_unet2d" if request.param == "unet2d" else "compiled_cond")


def ort_session(src, threads: int = 1):
    """An onnxruntime CPU session of a ModelProto or a path, quiet, ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def holdout_feeds(cm, batch: int = 2) -> dict:
    """ORT feeds of a compiled model's first held-out calibration batch (numpy, ``batch`` rows)."""
    b = (cm.calibration.holdout or cm.calibration.batches)[0]
    return {n: a[:batch].numpy() for n, a in zip(cm.signature.input_names, b.args)}


def quantize_tiny(unet: torch.nn.Module, steps: int = 3, groups: int = 1, sample_per_group: int = 128,
                  gm: fx.GraphModule | None = None, keep_8bit: tuple[str, ...] = ()):
    """annotate_sign, select_format (every layer 4-bit, but ``keep_8bit``) and insert_qdq on a tiny UNet, recompiled
    as the PassManager leaves it; returns (gm, sig). ``gm``: the UNet's captured graph, to rewrite instead of a new
    capture (e.g. ``stages_unet2d.fresh("capture")``)."""
    from msfp_compiler.passes.annotate_sign import AnnotateSign
    from msfp_compiler.passes.insert_qdq import InsertQDQ
    from msfp_compiler.passes.select_format import SelectFormat

    sig = signature_of(unet)
    calib = collect(unet, sig, 2, steps, 0, make_scheduler("ddim"), num_groups=groups, holdout_samples=0,
                    progress=False)
    if gm is None:
        gm, _ = capture(unet, sig)
    for p in (AnnotateSign(calib, sample_per_group), SelectFormat(QuantConfig(keep_8bit=keep_8bit)), InsertQDQ()):
        gm = p(gm).graph_module
    gm.recompile()
    return gm, sig


@pytest.fixture(scope="session")
def tuned(stages_unet2d):
    """The tiny UNet2DModel, quantized and fine-tuned with 2 LoRAs for a few steps (before fusion): (gm, sig,
    result)."""
    from msfp_compiler.config import FinetuneConfig
    from msfp_compiler.distillation import finetune

    unet = stages_unet2d.unet
    gm, sig = quantize_tiny(unet, steps=4, groups=2, sample_per_group=256, gm=stages_unet2d.fresh("capture"))
    data = collect(unet, sig, 4, 8, 1, make_scheduler("ddim"), num_groups=1, holdout_samples=0, progress=False)
    cfg = FinetuneConfig(steps=40, num_loras=2, rank=2, batch_size=4, lr=5e-3, samples=4, sampler_steps=8)
    res = finetune(gm, unet, sig, data, cfg, make_scheduler("ddim"), progress=False)
    return gm, sig, res


@pytest.fixture(autouse=True)
def _restore_msfp_logger():
    """The CLI installs a stderr handler on the 'msfp' logger and stops propagation; a test that runs it (test_cli,
    test_device) must not leave that behind: under xdist the handler outlives the test's stderr, and caplog-based
    tests on the same worker see no records."""
    lg = logging.getLogger("msfp")
    saved = (lg.handlers[:], lg.level, lg.propagate)
    yield
    lg.handlers[:], lg.level, lg.propagate = saved


# ---------------------------------------------------------------------------------------------------------------
# xdist: keep the tests that share an expensive session-scoped artifact on one worker

# Session fixtures that take tens of seconds to build, and the work group of the tests that ask for them (directly
# or through a fixture of their own module).
_FIXTURE_GROUP = {"compiled_unet2d": "compiled_unet2d", "packed_unet2d": "compiled_unet2d",
                  "compiled_cond": "compiled_cond", "stages_unet2d": "stages_unet2d", "tuned": "stages_unet2d",
                  "fp32_min": "fp32_min", "captured_cond": "captured_cond",
                  "compiled_text7": "compiled_text7"}
# Modules whose module-scoped fixtures are expensive: all their tests form one group.
_MODULE_GROUP = {"tests/test_cli.py": "cli"}
_COMPILED_PARAM = re.compile(r"\[(?:[^\]]*-)?(unet2d|cond)(?:-[^\]]*)?\]$")


@functools.cache
def _fixture_args(path: str) -> dict[str, tuple[str, ...]]:
    """Argument names of every function in a test module (tests and module fixtures), read from its source: the
    xdist controller schedules node ids and never imports the test modules."""
    tree = ast.parse((Path(__file__).parent.parent / path).read_text())
    return {f.name: tuple(a.arg for a in f.args.args) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}


def _work_group(nodeid: str) -> str | None:
    path, _, rest = nodeid.partition("::")
    path = path[path.index("tests/"):] if "tests/" in path else path
    if path in _MODULE_GROUP:
        return _MODULE_GROUP[path]
    funcs = _fixture_args(path)
    seen, todo = set(), [rest.split("::")[-1].split("[")[0]]
    while todo:  # the test's fixtures, and theirs where they are defined in the same module
        for arg in funcs.get(todo.pop(), ()):
            if arg == "compiled" and (m := _COMPILED_PARAM.search(nodeid)):
                return f"compiled_{m.group(1)}"
            if arg in _FIXTURE_GROUP:
                return _FIXTURE_GROUP[arg]
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return None


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: plain pytest without xdist ignores it
def pytest_xdist_make_scheduler(config, log):
    """``-n N`` distributes test by test (``--dist load``), so every worker would build every compiled model. Same
    scheduling, except that the tests sharing one expensive fixture above form one work unit. (``--dist loadgroup``
    with ``xdist_group`` marks would do this, but xdist 3.8 tags node ids through an attribute pytest 9 no longer
    reads.) Other ``--dist`` modes are left alone."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupedLoad(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_group(nodeid) or nodeid

    return GroupedLoad(config, log)
