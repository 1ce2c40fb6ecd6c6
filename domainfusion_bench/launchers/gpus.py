"""GPU launchers: ``multi_gpu`` (one run per GPU, in parallel) and ``accelerate`` (each run on all GPUs)."""

from __future__ import annotations

import os
import sys

from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.launchers.base import LAUNCHERS, option_list, positive_option
from domainfusion_bench.launchers.local import PoolLauncher


def visible_gpus() -> list[str]:
    """CUDA device ids this process may use: $CUDA_VISIBLE_DEVICES, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return option_list(env)
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@LAUNCHERS.register("accelerate")
class AccelerateLauncher(PoolLauncher):
    """One run after another, each across all GPUs (``accelerate launch``, one process per GPU)."""

    name = "accelerate"
    OPTIONS = {"gpus": None, "main_process_port": None}  # gpus: processes per run (default: all visible)

    def prefix(self) -> list[str]:
        n = positive_option(self.name, "gpus", self.options["gpus"]) if self.options["gpus"] is not None \
            else len(visible_gpus())
        if n < 1:
            raise DfbenchError("the accelerate launcher found no GPU; use --launcher local on a CPU machine")
        # The trainer picks its own precision (bf16 on CUDA); launch's flags only silence its defaults.
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            prefix.append("--multi_gpu")
        if self.options["main_process_port"] is not None:
            prefix += ["--main_process_port", str(self.options["main_process_port"])]
        return [*prefix, "-m", "domainfusion_bench"]


@LAUNCHERS.register("multi_gpu")
class MultiGPULauncher(PoolLauncher):
    """Runs in parallel, one per GPU (``CUDA_VISIBLE_DEVICES`` set per child)."""

    name = "multi_gpu"
    OPTIONS = {"gpus": None}  # device ids, e.g. "0,1,3" (default: every visible GPU)

    def slots(self) -> list[tuple[str, dict[str, str]]]:
        gpus = option_list(self.options["gpus"]) or visible_gpus()
        if not gpus:
            raise DfbenchError("the multi_gpu launcher found no GPU; use --launcher local, or -O gpus=0,1")
        return [(f"GPU {gpu}", {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}) for gpu in gpus]
