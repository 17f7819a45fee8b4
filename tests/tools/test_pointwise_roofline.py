"""tools/pointwise_roofline.py: Inductor kernels sorted by the aten ops in their names; each category's lower bound of
bytes; the table from a profile's kernel list."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import pointwise_roofline as PR  # noqa: E402


def test_categories_bytes_and_table():
    assert PR.category("triton_red_fused__to_copy_add_mul_permute_var_mean_view_13") == "gn_stats"
    assert PR.category("triton_per_fused_clone_native_group_norm_16") == "gn_stats"  # aten's reduction
    assert PR.category("triton_poi_fused_conv_e4m3_div_expand_mean_mul_pow_round_rsqrt_silu_3") == "gn_apply"
    assert PR.category("_gn_partial_kernel") == PR.category("_gn_combine_kernel") == "gn_stats"  # ours
    assert PR.category("triton_poi_fused_add_conv_e4m3_expand_mul_neg_permute_round_select_silu_9") == "gn_apply"
    assert PR.category("triton_per_fused__scaled_mm_native_layer_norm_round_23") == "layernorm"
    assert PR.category("triton_poi_fused_gelu_mul_split_view_18") == "geglu"
    assert PR.category("triton_poi_fused_add_mul_permute_view_12") == "other_pointwise"
    assert len(PR.GROUP_NORMS) == 61 and len(PR.TRANSFORMERS) == 16 and len(PR.RESNETS) == 22
    b8, b1 = PR.min_bytes(8), PR.min_bytes(1)
    assert all(abs(b8[k] - 8 * b1[k]) < 1e-3 * b8[k] for k in b8)  # every category scales with the batch
    assert round(b8["gn_stats"] / 1e6) == 721  # 360M bf16 elements read once (docs/triton.md session 13)
    rows = [{"kernel": "triton_poi_fused_gelu_mul_split_view_18", "ms_per_step": 0.9, "calls_per_step": 16.0},
            {"kernel": "nvjet_sm90_gemm", "ms_per_step": 5.0, "calls_per_step": 1.0}]  # not Inductor's: left out
    t = PR.table(rows, 8)
    assert "| geglu | 16 | 0.900 |" in t and "nvjet" not in t and t.splitlines()[-1].startswith("| all | | 0.900 |")
