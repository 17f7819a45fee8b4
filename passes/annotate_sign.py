"""annotate_sign: a TensorRecord with the calibration statistics on every quantized operand's producer.

For every tensor that a conv / linear / attention layer reads as a quantized operand: its role, consumers, whether
it comes from a SiLU, and (activations) the per-timestep-group statistics of calibration (min, max, negative count,
a bounded random subsample for the MSE search in select_format). The statistics come with the calibration set when
calibration ran through the captured graph (``collect(graph=...)``, what compile does); for a calibration set
without them (recorded inputs only) they are computed here from the recorded inputs, one forward per batch.
Weights get a record too (their values are in the module, no statistics needed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx

from msfp_compiler.calibration import ActivationStats, CalibrationSet, activation_stats
from msfp_compiler.errors import MsfpError
from msfp_compiler.layer_graph import quant_operands
from msfp_compiler.names import tensor_names
from msfp_compiler.pass_manager import Pass, PassResult
from msfp_compiler.record import META_KEY, TensorRecord

__all__ = ["AnnotateSign"]


@dataclass
class AnnotateSign(Pass):
    """Pass: attach a TensorRecord with per-timestep-group statistics to every quantized operand's producer."""

    calib: CalibrationSet
    sample_per_group: int = 4096
    seed: int = 0
    quantize_attention: bool = True  # False: q, k, v of scaled_dot_product_attention get no record (stay float)
    split_concat: bool = True  # parts of a channel concatenation feeding a conv get a record each
    name: str = "annotate_sign"

    def requires(self, gm: fx.GraphModule) -> None:
        if not self.calib.groups or not self.calib.batches:
            raise MsfpError("annotate_sign: the calibration set is empty")

    def _stats(self, gm: fx.GraphModule, acts: list[fx.Node]) -> tuple[ActivationStats, bool]:
        """The calibration set's statistics when they were computed for these nodes with this subsample size and
        seed, else computed now; and whether they came with the calibration."""
        st = self.calib.stats
        if (st is not None and st.sample_per_group == self.sample_per_group and st.seed == self.seed
                and set(st.groups) == {n.name for n in acts}
                and all(len(g) == len(self.calib.groups) for g in st.groups.values())):
            return st, True
        return activation_stats(gm, self.calib, self.sample_per_group, self.seed, self.quantize_attention,
                                split_concat=self.split_concat), False

    def call(self, gm: fx.GraphModule) -> PassResult:
        ops = quant_operands(gm, self.quantize_attention, self.split_concat)
        stats, reused = self._stats(gm, [q.producer for q in ops if q.role == "act"])
        acts = []
        n_act = n_w = n_silu = 0
        for q in ops:
            rec = TensorRecord(q.role, [c.name for c in q.consumers], q.layer_kind, after_silu=q.after_silu)
            if q.role == "weight":
                rec.channel_axis = 0
                n_w += 1
            else:
                rec.groups = copy.deepcopy(stats.groups[q.producer.name])  # records are the graph's to rewrite
                n_act += 1
                n_silu += q.after_silu
                acts.append((q.producer.name, rec))
            q.producer.meta[META_KEY] = rec
        names = tensor_names(gm)  # by module path of the layers reading them: needs the records
        report = [f"{names.get(n, n):<56} min {rec.min:+9.4f} max {rec.max:+9.4f} neg {rec.neg_fraction:6.1%}"
                  f"{'  after SiLU' if rec.after_silu else ''}" for n, rec in acts]
        info = {"activations": n_act, "weights": n_w, "after_silu": n_silu, "timestep_groups": len(self.calib.groups),
                "calib_batches": len(self.calib.batches),
                "statistics": "from the calibration forwards" if reused else "one forward per calibration batch"}
        return PassResult(gm, bool(n_act or n_w), info, report)
