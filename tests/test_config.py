"""config: plain-data options; validation errors name the config field, and the CLI turns fields into flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from msfp_compiler.cli import FLAGS, compile_parser, flag_message
from msfp_compiler.config import CalibConfig, CompileConfig, FinetuneConfig, QuantConfig
from msfp_compiler.errors import MsfpError


def test_config_does_not_import_training_code() -> None:
    code = "import sys, msfp_compiler.config; print(sorted(m for m in sys.modules if m.startswith('msfp_compiler')))"
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "distillation" not in mods and "talora" not in mods and "calibration" not in mods, mods


@pytest.mark.parametrize("make,field", [
    (lambda: QuantConfig(scheme="fp5"), "QuantConfig.scheme"),
    (lambda: QuantConfig(act_formats=("e4m3",)), "QuantConfig.act_formats"),
    (lambda: QuantConfig(weight_formats=("ue2m1",)), "QuantConfig.weight_formats"),
    (lambda: QuantConfig(weight_granularity="row"), "QuantConfig.weight_granularity"),
    (lambda: QuantConfig(sign_rule="vote"), "QuantConfig.sign_rule"),
    (lambda: CalibConfig(num_samples=0), "CalibConfig.num_samples"),
    (lambda: CalibConfig(text_len=0), "CalibConfig.text_len"),
    (lambda: FinetuneConfig(rank=0), "FinetuneConfig.rank"),
    (lambda: FinetuneConfig(holdout_samples=-1), "FinetuneConfig.holdout_samples"),
    (lambda: FinetuneConfig(samples=0), "FinetuneConfig.samples"),
    (lambda: FinetuneConfig(trajectories="teacher"), "FinetuneConfig.trajectories"),
    (lambda: CompileConfig(conv_weights="float16"), "CompileConfig.conv_weights"),
    (lambda: CompileConfig(conv_weights="float32:1.5"), "CompileConfig.conv_weights"),
])
def test_errors_name_the_field_and_the_cli_maps_it_to_its_flag(make, field) -> None:
    with pytest.raises(MsfpError, match=field.replace(".", r"\.")) as e:
        make()
    flags = {a for action in compile_parser()._actions for a in action.option_strings}
    assert FLAGS[field] in flags  # every mapped flag exists
    assert FLAGS[field] in flag_message(str(e.value)) and field not in flag_message(str(e.value))


def test_defaults_are_valid_frozen_data() -> None:
    cfg = CompileConfig(finetune=FinetuneConfig())
    assert cfg.quant.act_candidates and cfg.quant.weight_candidates
    with pytest.raises(Exception):
        cfg.quant.scheme = "int4"  # type: ignore[misc]
