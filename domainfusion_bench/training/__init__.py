"""One training run, DomainBed's loop: a minibatch from every training domain per step, evaluation
and one record per checkpoint, a resume point after each record, ``done`` last.

The trainer owns devices, precision and distribution (through accelerate); it does not know which
algorithm it runs beyond the ``Algorithm`` API.

``args`` what a run is asked to do; ``context`` what an algorithm's hooks see; ``runtime`` device,
precision and DDP; ``data_setup`` dataset and splits; ``evaluation`` accuracy; ``setup`` a run set up;
``resume`` resume points; ``loop`` the steps and checkpoints; ``run`` ``train`` around it all.
"""

from domainfusion_bench.training.args import (
    DEFAULT_OUTPUT_ROOT, STORE_MAX_GB, Speed, TrainArgs, default_workers, resolve_hparams, run_fingerprint,
)
from domainfusion_bench.training.context import TrainingContext
from domainfusion_bench.training.data_setup import data_to_device, load_data, make_splits, model_input
from domainfusion_bench.training.evaluation import accuracy, splits_to_evaluate
from domainfusion_bench.training.run import train
from domainfusion_bench.training.runtime import BUCKET_BYTES, LossStep, Runtime
from domainfusion_bench.training.setup import protocol_settings, set_up, write_previews

__all__ = [
    "BUCKET_BYTES", "DEFAULT_OUTPUT_ROOT", "STORE_MAX_GB", "LossStep", "Runtime", "Speed", "TrainArgs",
    "TrainingContext", "accuracy", "data_to_device", "default_workers", "load_data", "make_splits", "model_input",
    "protocol_settings", "resolve_hparams", "run_fingerprint", "set_up", "splits_to_evaluate", "train",
    "write_previews",
]
