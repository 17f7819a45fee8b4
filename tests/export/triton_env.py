"""Set-up shared by the Triton kernel tests; import it before any kernel module.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before they are defined) on small
shapes; with CUDA the same tests run the real kernels. A module importing this is skipped where triton is missing or
where the interpreter was switched off."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is off", allow_module_level=True)

DEV = torch.device("cuda" if CUDA else "cpu")
