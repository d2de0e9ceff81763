"""Load a ``.bin`` checkpoint with all weights offloaded to disk: a subprocess the offload-folder tests run (and kill).

Usage: ``python offload_job.py CHECKPOINT OFFLOAD_FOLDER OUTPUT [--kill-at N] [--slow S] [--barrier DIR]``.

``--kill-at N`` makes the process SIGKILL itself when the N-th file's temporary copy is complete but not yet renamed
(N - 1 files committed, no manifest yet). ``--slow S`` sleeps S seconds after each committed file, so that concurrent
jobs overlap. ``--barrier DIR`` touches ``DIR/ready-<pid>`` after the imports and waits for ``DIR/go``. On success the
job saves ``{"output": model(example_input), "written": files it wrote}`` to OUTPUT.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import types

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Import the loading engine without the package's __init__, which imports Lightning (~3 s more per process, twice
# at once in the concurrency test). The modules used below are the library's own, unchanged.
_package = types.ModuleType("lightning_bigmodel")
_package.__path__ = [str(HERE.parent / "lightning_bigmodel")]
sys.modules.setdefault("lightning_bigmodel", _package)

import torch  # noqa: E402
from models import UntiedMLP, example_input  # noqa: E402

from lightning_bigmodel.checkpoint.loading import load_checkpoint_in_model  # noqa: E402  (first: import cycle)
from lightning_bigmodel.init import init_empty_weights  # noqa: E402
from lightning_bigmodel.offload import disk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("folder")
    parser.add_argument("output")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--barrier", default=None)
    args = parser.parse_args()

    counts = {"tmp-written": 0, "committed": 0}

    def fault_point(stage: str, path: Path) -> None:
        if path.name.startswith(".offload_index.json") or path.name == disk.MANIFEST:
            return
        counts[stage] += 1
        if stage == "tmp-written" and counts[stage] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if stage == "committed" and args.slow:
            time.sleep(args.slow)

    disk._fault_point = fault_point
    if args.barrier:
        barrier = Path(args.barrier)
        (barrier / f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while not (barrier / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    with init_empty_weights():
        model = UntiedMLP().eval()
    load_checkpoint_in_model(model, args.checkpoint, device_map={"": "disk"}, offload_folder=args.folder)
    with torch.inference_mode():
        output = model(example_input(UntiedMLP))
    torch.save({"output": output, "written": counts["committed"]}, args.output)


if __name__ == "__main__":
    main()
