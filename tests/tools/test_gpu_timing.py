"""tools/gpu_timing.hold_gpu_lock: the lock the GPU benchmarks share, held until the process ends."""

import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_gpu_lock_held_after_the_caller_returns(tmp_path):
    lock = tmp_path / "gpu.lock"
    # a child takes the lock inside a function that returns, then asks a grandchild to take it without waiting
    probe = (f"import fcntl; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    child = (f"import sys, subprocess; sys.path.insert(0, {str(TOOLS)!r}); import gpu_timing\n"
             f"def take(): gpu_timing.hold_gpu_lock({str(lock)!r})\n"
             f"take(); import gc; gc.collect()\n"
             f"r = subprocess.run([sys.executable, '-c', {probe!r}])\n"
             f"sys.exit(0 if r.returncode != 0 else 1)")
    assert subprocess.run([sys.executable, "-c", child]).returncode == 0
    # once the holder has exited, the lock is free again
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
