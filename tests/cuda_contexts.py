"""Which GPUs hold a CUDA primary context, asked from the driver itself (``cuDevicePrimaryCtxGetState``).

Run in a fresh process (:func:`run_and_list_contexts`): a test session creates contexts of its own, and a context
once created stays for the life of the process.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


def active_contexts() -> list[int]:
    """Ordinals (as this process sees them) of the GPUs whose primary context is active."""
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0
    count = ctypes.c_int()
    assert cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
    active = []
    for ordinal in range(count.value):
        device, flags, state = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        assert cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0
        assert cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(state)) == 0
        if state.value:
            active.append(ordinal)
    return active


def run_and_list_contexts(body: str, cwd: Path) -> dict:
    """Run ``body`` (Python; it may set ``result``) in a fresh process; return ``{"contexts": [...], "result": ...}``."""
    root = Path(__file__).resolve().parents[1]
    header = (
        f"import json, sys\nsys.path[:0] = [{str(root)!r}, {str(root / 'tests')!r}]\n"
        "from cuda_contexts import active_contexts\nresult = None\n"
    )
    footer = '\nprint("@@" + json.dumps({"contexts": active_contexts(), "result": result}))\n'
    script = header + textwrap.dedent(body) + footer
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_"))}
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("@@")][-1]
    return json.loads(line[2:])
