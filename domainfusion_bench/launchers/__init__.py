"""Launchers: how a sweep's jobs become processes. One registry; every command is an argument list.

- ``local``: runs in child processes on this machine, one at a time (``parallel: N`` runs N at once,
  each with ``threads`` torch threads).
- ``multi_gpu``: one run per visible GPU at a time, in parallel.
- ``accelerate``: one run after another, each across all GPUs via ``accelerate launch``.
- ``slurm``: a submitit job array (partition, time, gpus, array parallelism); a pre-empted or timed-out
  job is requeued and the run resumes from its checkpoint. ``cluster: local`` runs it with submitit's
  local executor (tests, debugging).
- ``dry_run``: prints the commands, runs nothing.

A failed run never stops the others. Before a run starts, the launcher re-reads its state (another
launcher may have taken it) and holds the run dir's lock itself until the training process writes its
own, so ``status`` shows it running. The child's stderr goes to ``launch_stderr.txt`` in its run dir
(a file, not a pipe: the run survives its launcher); when a child dies without saying why (a signal, an
import error), the launcher writes the ``failed`` file with the exit status and that file's last lines.
"""

# in the order they register, which is the order the registry lists them in
from domainfusion_bench.launchers.local import LocalLauncher, PoolLauncher, pipeline_order
from domainfusion_bench.launchers.gpus import AccelerateLauncher, MultiGPULauncher, visible_gpus
from domainfusion_bench.launchers.slurm import SlurmLauncher, SubmititRun
from domainfusion_bench.launchers.dry_run import DryRunLauncher
from domainfusion_bench.launchers.base import LAUNCHERS, Launcher, LaunchResult, Outcome
from domainfusion_bench.launchers.child import LAUNCH_LOG, STDERR_TAIL, claim, release, run_job
from domainfusion_bench.launchers.launch import launch_sweep, make_launcher

__all__ = [
    "LAUNCHERS", "LAUNCH_LOG", "STDERR_TAIL", "AccelerateLauncher", "DryRunLauncher", "LaunchResult", "Launcher",
    "LocalLauncher", "MultiGPULauncher", "Outcome", "PoolLauncher", "SlurmLauncher", "SubmititRun", "claim",
    "launch_sweep", "make_launcher", "pipeline_order", "release", "run_job", "visible_gpus",
]
