"""One training run, DomainBed's loop: a minibatch from every training domain per step, evaluation
and one record per checkpoint, a resume point after each record, ``done`` last.

The trainer owns devices, precision and distribution (through accelerate); it does not know which
algorithm it runs beyond the ``Algorithm`` API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms import ALGORITHMS, Algorithm, algorithm_space, load_plugins
from domainfusion_bench.costs import CostMeter, MetricMeter
from domainfusion_bench.data import MultiDomainDataset, dataset_class, get_dataset, run_identity
from domainfusion_bench.data.loaders import SplitDataset, eval_batches, training_batches
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.paths import DEFAULT_DATA_DIR
from domainfusion_bench.hparams import apply_overrides, check_train_args, parse_hparams_json
from domainfusion_bench.protocol import HOLDOUT_FRACTION, run_hash, semantic_args, split_indices

# Folder datasets up to this many GiB (uint8 at the training resolution) are decoded once into a store.
STORE_MAX_GB = float(os.environ.get("DFBENCH_STORE_GB", "8"))
DEFAULT_OUTPUT_ROOT = "results/train"


@dataclass
class Speed:
    """How a run feeds the device. The defaults are the fast path; ``domainbed()`` is DomainBed's way.

    None of this changes what is trained on (same splits, batches and augmentation distributions), so
    it is not part of ``TrainArgs`` and not part of a run's hash.
    """

    channels_last: bool | None = None  # None: on CUDA
    pin_memory: bool | None = None  # None: on CUDA
    image_store: bool = True  # decode small folder datasets once into a cached uint8 store
    store_max_gb: float = STORE_MAX_GB
    data_on_device: bool = True  # keep tensor datasets on the GPU when they take <= 1/4 of its memory
    per_domain_loaders: bool = False  # one DataLoader with num_workers per training domain
    eval_augment: bool = False  # evaluate training domains with the training transform (DomainBed)

    def on(self, cuda: bool) -> "Speed":
        """These settings with the "on CUDA" defaults decided for this device."""
        return dataclasses.replace(self, channels_last=cuda if self.channels_last is None else self.channels_last,
                                   pin_memory=cuda if self.pin_memory is None else self.pin_memory)

    @classmethod
    def domainbed(cls) -> "Speed":
        return cls(channels_last=False, pin_memory=False, image_store=False, data_on_device=False,
                   per_domain_loaders=True, eval_augment=True)


@dataclass
class TrainArgs:
    """DomainBed's train.py flags, plus dfbench's. ``asdict`` of this is the record's ``args``."""

    dataset: str = "RotatedDigits"
    algorithm: str = "ERM"
    test_envs: list[int] = field(default_factory=lambda: [0])
    data_dir: str = DEFAULT_DATA_DIR
    output_dir: str | None = None  # default: results/train/<run hash>, one dir per configuration
    hparams: str | None = None  # JSON overrides
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int = 0
    steps: int | None = None  # default: the dataset's N_STEPS
    checkpoint_freq: int | None = None  # default: the dataset's CHECKPOINT_FREQ
    holdout_fraction: float = HOLDOUT_FRACTION
    skip_model_save: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    eval_splits: str = "needed"  # needed | all
    precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    num_workers: int | None = None  # one pool for all training domains; default min(8, cores)
    eval_batch_size: int | None = None
    gen_batch_size: int | None = None  # images per denoiser call in generation stages (speed only)
    plugins: list[str] = field(default_factory=list)
    eval_augment: bool = False  # DomainBed: training domains' validation splits use the training transform


@dataclass
class TrainingContext:
    """What an algorithm's hooks (``prepare``, ``on_step``, ``load_extra_state``) may use: the data it is
    allowed to see, the run's device and precision, the caches, and where to account cost and metrics."""

    dataset: MultiDomainDataset
    train_envs: list[int]
    test_envs: list[int]
    train_splits: list[SplitDataset]  # in-splits of the training domains, training transform applied
    hparams: dict[str, Any]
    args: TrainArgs
    device: torch.device
    costs: CostMeter
    cache_dir: Path
    metrics: MetricMeter = field(default_factory=MetricMeter)
    made_by: str = ""  # who made cached work: this run's directory
    steps_per_epoch: float = 1.0  # of the real training splits
    autocast: Any = contextlib.nullcontext  # ``with context.autocast():`` runs in the run's precision
    heartbeat: Any = lambda: None  # call inside long pre-stages: the run stays visibly alive
    is_main: bool = True
    previews: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> a few uint8 generated images

    @property
    def models(self):
        """The cached-model store for helper models (``diffusion/store.py``)."""
        from domainfusion_bench.diffusion.factory import MODELS_SUBDIR
        from domainfusion_bench.diffusion.store import ModelStore

        return ModelStore(self.cache_dir / MODELS_SUBDIR, heartbeat=self.heartbeat)

    @property
    def generations(self):
        """The generation cache (``diffusion/cache.py``)."""
        from domainfusion_bench.diffusion.cache import GenerationCache
        from domainfusion_bench.diffusion.factory import GENERATIONS_SUBDIR

        return GenerationCache(self.cache_dir / GENERATIONS_SUBDIR)


def resolve_hparams(args: TrainArgs) -> dict[str, Any]:
    space = algorithm_space(args.algorithm, dataset_class(args.dataset))
    hparams = space.sample(args.hparams_seed, args.trial_seed)
    where = f"{args.algorithm} on {args.dataset}"
    return apply_overrides(hparams, parse_hparams_json(args.hparams), where)


BUCKET_BYTES = 25 * 2**20  # gradients per all-reduce (DDP's default bucket_cap_mb)


class LossStep(torch.nn.Module):
    """An algorithm's ``loss`` as a module's forward. Under several processes this is what DDP wraps:
    every training step's forward then goes through DDP, which records the parameters the step used and
    arms its bucketed all-reduce, overlapped with the backward pass. Algorithms keep calling their own
    sub-modules (featurizer, classifier, ...) inside ``loss``; DDP hooks the parameters, not the calls."""

    def __init__(self, algorithm: Algorithm):
        super().__init__()
        self.algorithm = algorithm

    def forward(self, minibatches):
        return self.algorithm.loss(minibatches)


class Runtime:
    """Device, precision and processes, through accelerate; single-process runs use it too.

    Several processes (``accelerate launch``) train one run with accelerate's DDP (``accelerator.prepare``
    of the algorithm's ``LossStep``): gradients are averaged in buckets of ~25 MB, overlapped with the
    backward pass, only over trainable parameters (frozen helper models are left out); parameters a step
    does not use are found and skipped (``find_unused_parameters``), so no rank waits for a gradient that
    never comes. An algorithm that overrides ``update`` and computes its loss without ``LossStep`` still
    gets averaged gradients: ``backward`` then all-reduces them itself, one flat tensor per bucket.
    """

    def __init__(self, args: TrainArgs):
        from accelerate import Accelerator

        want_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        if not want_cpu and not torch.cuda.is_available():
            raise DfbenchError(f"--device {args.device} asked for CUDA, but torch sees no GPU. Use --device cpu.")
        if args.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
            torch.cuda.set_device(int(args.device.split(":")[1]))
        bf16 = args.precision == "bf16" or (args.precision == "auto" and not want_cpu and torch.cuda.is_bf16_supported())
        from accelerate.utils import DistributedDataParallelKwargs

        # find_unused_parameters: a method's extra losses may leave some trainable parameters out of a step
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(cpu=want_cpu, mixed_precision="bf16" if bf16 else "no", kwargs_handlers=[ddp])
        self.device = self.accelerator.device
        self.cuda = self.device.type == "cuda"
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if self.cuda:
            torch.backends.cudnn.benchmark = not args.deterministic
        if args.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.ddp: torch.nn.Module | None = None  # the DDP-wrapped LossStep, under several processes
        self._ddp_armed = False  # a forward went through DDP and its backward has not run yet
        self.flat_all_reduces = 0  # all-reduces of the fallback path (tests count them)

    def distribute(self, algorithm: Algorithm, params: Sequence[torch.nn.Parameter]) -> None:
        """Under several processes: wrap the algorithm's loss in accelerate's DDP and route its training
        steps through it (``algorithm.loss_step``). One process: nothing changes."""
        if self.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        step = LossStep(algorithm)
        trainable = {id(p) for p in params}
        frozen = [f"algorithm.{name}" for name, p in algorithm.named_parameters() if id(p) not in trainable]
        for prefix, module in algorithm.named_modules():  # and the buffers of wholly frozen modules
            own = list(module.parameters())
            if own and not any(id(p) in trainable for p in own):
                frozen += [f"algorithm.{prefix}.{name}".replace("..", ".") for name, _ in module.named_buffers()]
        # frozen helper models (diffusion backbones, oracles) are neither broadcast nor all-reduced
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
        self.ddp = self.accelerator.prepare(step)

        def loss_step(minibatches):
            self._ddp_armed = True
            return self.ddp(minibatches)

        algorithm.loss_step = loss_step

    def backward(self, loss: torch.Tensor, params: Sequence[torch.nn.Parameter], **kw) -> None:
        """``kw`` (retain_graph, create_graph) goes to ``Tensor.backward``. Under several processes the
        gradients come out averaged over ranks (each rank saw a slice of every minibatch)."""
        armed, self._ddp_armed = self._ddp_armed, False
        self.accelerator.backward(loss, **kw)
        if self.world > 1 and not armed:  # the loss did not come through DDP: average here, bucket by bucket
            self.all_reduce_gradients(params)

    def all_reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average ``params``' gradients over ranks with one all-reduce per ~25 MB bucket (gradients and a
        used-flag per parameter, flattened together). A parameter without a gradient on every rank keeps
        none (as under DDP); one with a gradient on some ranks gets the average, counting the others as 0."""
        import torch.distributed as dist

        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), group in groups.items():
            bucket, size = [], 0
            for p in group + [None]:
                if p is not None and (not bucket or size + p.numel() * p.element_size() <= BUCKET_BYTES):
                    bucket.append(p)
                    size += p.numel() * p.element_size()
                    continue
                flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in bucket]
                                 + [torch.tensor([float(q.grad is not None) for q in bucket], dtype=dtype, device=device)])
                dist.all_reduce(flat)
                self.flat_all_reduces += 1
                used, offset = flat[-len(bucket):], 0
                for q, n_used in zip(bucket, used.tolist()):
                    mean = flat[offset:offset + q.numel()].view_as(q).div_(self.world)
                    offset += q.numel()
                    if n_used > 0:
                        if q.grad is None:
                            q.grad = mean.clone()
                        else:
                            q.grad.copy_(mean)
                if p is not None:
                    bucket, size = [p], p.numel() * p.element_size()

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values, reduction="sum") if self.world > 1 else values

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.device), reduction="mean") if self.world > 1 else values

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def protocol_settings(runtime: Runtime, speed: Speed, args: TrainArgs, dataset: MultiDomainDataset) -> dict[str, Any]:
    """What this run did where dfbench differs from DomainBed 2020 (README, "Differences, on purpose"),
    recorded in every record's ``args`` so a number says how it was made."""
    return {"precision": "bf16" if runtime.accelerator.mixed_precision == "bf16" else "fp32",
            "cudnn_benchmark": bool(runtime.cuda and torch.backends.cudnn.benchmark),
            "eval_augment": bool(speed.eval_augment or args.eval_augment),
            "eval_splits": args.eval_splits,
            "dataset": list(getattr(dataset, "DIFFERENCES", ()))}


def make_splits(dataset: MultiDomainDataset, args: TrainArgs, hparams: dict[str, Any], eval_augment: bool = False):
    """(training splits, evaluation splits by name, index record).

    Training splits are the training domains' in-splits with the training transform. Evaluation splits
    are every in/out split without augmentation, or, with ``eval_augment`` (DomainBed), the training
    domains' splits with the training transform.
    """
    augment = hparams.get("data_augmentation", True)
    eval_tf, train_tf = dataset.eval_transform(), dataset.train_transform(augment)
    batch_tf = getattr(dataset, "batch_transform", lambda augment: None)  # stored folder datasets have one
    eval_btf, train_btf = batch_tf(False), batch_tf(augment)
    train, splits, index_record = [], {}, {}
    for i, env in enumerate(dataset.envs):
        out_idx, in_idx = split_indices(len(env), args.trial_seed, i, args.holdout_fraction)
        if i not in args.test_envs:
            train.append(SplitDataset(env, in_idx, train_tf, train_btf))
        tf, btf = (train_tf, train_btf) if eval_augment and i not in args.test_envs else (eval_tf, eval_btf)
        splits[f"env{i}_in"] = SplitDataset(env, in_idx, tf, btf)
        splits[f"env{i}_out"] = SplitDataset(env, out_idx, tf, btf)
        index_record[f"env{i}"] = {"domain": dataset.domains[i], "in": in_idx, "out": out_idx}
    return train, splits, index_record


def load_data(args: TrainArgs, speed: Speed, dataset: MultiDomainDataset | None = None, workers: int = 0) -> MultiDomainDataset:
    """The run's dataset, decoded into the uint8 store when it is a small folder dataset."""
    dataset = dataset or get_dataset(args.dataset, args.data_dir)
    dataset.check_test_envs(args.test_envs)
    store = getattr(dataset, "load_store", None)
    if (speed.image_store and store is not None and not dataset.stored
            and dataset.store_bytes() <= speed.store_max_gb * 2**30):
        started = time.perf_counter()
        path = store(Path(args.data_dir) / ".dfbench_cache", num_workers=workers)
        print(f"image store: {path} ({dataset.store_bytes() / 2**30:.2f} GiB, {time.perf_counter() - started:.1f} s)")
    return dataset


def data_to_device(splits: Sequence[SplitDataset], device: torch.device, speed: Speed) -> None:
    """Move the tensors behind tensor-backed splits onto the GPU once, when they take <= 1/4 of its memory."""
    if device.type != "cuda" or not speed.data_on_device:
        return
    datasets = {id(s.dataset): s.dataset for s in splits if isinstance(s, SplitDataset) and s.tensor_view() is not None}
    total = sum(t.numel() * t.element_size() for d in datasets.values() for t in d.tensors)
    if total <= torch.cuda.get_device_properties(device).total_memory / 4:
        for d in datasets.values():
            d.tensors = tuple(t.to(device) for t in d.tensors)


def model_input(x: torch.Tensor, runtime: "Runtime", channels_last: bool) -> torch.Tensor:
    x = x.to(runtime.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def set_up(algorithm: Algorithm, context: TrainingContext, eval_splits: Sequence[SplitDataset], runtime: Runtime,
           speed: Speed) -> list[SplitDataset]:
    """Put the model on its device, let the algorithm prepare (a generative one trains helpers and
    generates here, on that device and in the run's precision), put the data on the device and build the
    optimizers. Under DDP the main process prepares first; the others then find its work in the caches.
    Returns the splits it trains on."""
    algorithm.to(runtime.device)
    with runtime.accelerator.main_process_first():
        replaced = algorithm.prepare(context)
    train_splits = list(context.train_splits if replaced is None else replaced)
    data_to_device(train_splits + list(eval_splits), runtime.device, speed)
    algorithm.to(runtime.device)  # prepare may have added modules
    if speed.on(runtime.cuda).channels_last:
        algorithm.to(memory_format=torch.channels_last)
    params = [p for p in algorithm.parameters() if p.requires_grad]
    algorithm.backward = lambda loss, **kw: runtime.backward(loss, params, **kw)
    runtime.distribute(algorithm, params)
    algorithm.setup_optimizers()
    return train_splits


def write_previews(run_dir: Path, previews: dict[str, torch.Tensor]) -> None:
    """``previews/<name>.png``: a row of generated images per stage and domain (the HTML leaderboard shows them)."""
    from torchvision.utils import save_image

    folder = run_dir / runfiles.PREVIEWS
    folder.mkdir(exist_ok=True)
    for name, images in previews.items():
        path = folder / f"{name}.png"
        if not path.exists():
            tmp = folder / f".{name}.tmp{os.getpid()}.png"
            save_image(images.float().div(255.0) if images.dtype == torch.uint8 else images, str(tmp),
                       nrow=len(images), padding=1)
            os.replace(tmp, path)


def splits_to_evaluate(n_domains: int, test_envs: Sequence[int], mode: str) -> list[str]:
    """``needed``: what model selection reads (train domains' out, test domains' in and out)."""
    if mode == "all":
        return [f"env{i}_{s}" for i in range(n_domains) for s in ("in", "out")]
    names = []
    for i in range(n_domains):
        names += [f"env{i}_in", f"env{i}_out"] if i in test_envs else [f"env{i}_out"]
    return names


def accuracy(algorithm: Algorithm, split: SplitDataset, runtime: Runtime, batch_size: int, workers: int,
             speed: Speed | None = None) -> float:
    speed = (speed or Speed()).on(runtime.cuda)
    correct = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    algorithm.eval()
    with torch.no_grad(), runtime.accelerator.autocast():
        for x, y in eval_batches(split, batch_size, num_workers=workers, pin_memory=speed.pin_memory,
                                 rank=runtime.rank, world=runtime.world, device=runtime.device):
            x = model_input(x, runtime, speed.channels_last)
            y = y.to(runtime.device, non_blocking=True)
            pred = algorithm.predict(x).argmax(1)
            correct += torch.stack([(pred == y).sum().double(), torch.tensor(float(len(y)), device=runtime.device)])
    algorithm.train()
    correct = runtime.sum_over_ranks(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Tee:
    """Copies a stream to a log file in the run directory (DomainBed's out.txt / err.txt)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a")

    def write(self, text: str) -> int:
        self.file.write(text)
        self.file.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def _logs_to(run_dir: Path, enabled: bool):
    if not enabled:
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, run_dir / "out.txt"), _Tee(err, run_dir / "err.txt")
    try:
        yield
    finally:
        sys.stdout.file.close(), sys.stderr.file.close()
        sys.stdout, sys.stderr = out, err


def run_fingerprint(args: TrainArgs, hparams: dict[str, Any]) -> dict[str, Any]:
    """What defines a run: the arguments that change its result (plugins by content) and the resolved
    hyperparameters. A run dir holds one fingerprint; training into it with another one is refused."""
    return {**semantic_args(run_identity(dataclasses.asdict(args))), "hparams_resolved": hparams}


def train(args: TrainArgs) -> Path:
    """Run (or resume, or skip if done) one training run; returns its run directory."""
    check_train_args(args)
    load_plugins(args.plugins)
    ALGORITHMS.get(args.algorithm)  # fail fast on an unknown name, before loading data
    hparams = resolve_hparams(args)
    if args.output_dir is None:  # one dir per configuration, never a shared one
        args = dataclasses.replace(args, output_dir=str(Path(DEFAULT_OUTPUT_ROOT) / run_hash(run_identity(dataclasses.asdict(args)))))
    run_dir = Path(args.output_dir)
    fingerprint = run_fingerprint(args, hparams)
    runfiles.check_fingerprint(run_dir, fingerprint)
    if (run_dir / runfiles.DONE).exists():
        print(f"{run_dir} is already done; nothing to do.")
        return run_dir
    runtime = Runtime(args)
    beat = contextlib.nullcontext()
    if runtime.is_main:
        claimed, holder = runfiles.claim(run_dir, token=os.environ.get(runfiles.CLAIM_ENV))
        if not claimed:  # the loser writes nothing into the run
            raise DfbenchError(
                f"{run_dir} is being trained right now by process {holder.get('pid')} on {holder.get('host', '?')} "
                "(see its lock file): wait for it to finish, or stop that process and run this again to resume"
            )
        runfiles.check_fingerprint(run_dir, fingerprint)  # again, now that the run is ours
        (run_dir / runfiles.FAILED).unlink(missing_ok=True)
        runfiles.write_fingerprint(run_dir, fingerprint)
        beat = runfiles.Heartbeat(run_dir)
    try:
        with beat, _logs_to(run_dir, runtime.is_main):
            _train(args, hparams, runtime, run_dir)
    except BaseException as err:
        if runtime.is_main and runfiles.holds_lock(run_dir):
            reason = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
            runfiles.atomic_write_text(run_dir / runfiles.FAILED, json.dumps(reason, indent=1))
        raise
    finally:
        if runtime.is_main:
            runfiles.release_lock(run_dir)
    return run_dir


def default_workers(args: TrainArgs) -> int:
    return args.num_workers if args.num_workers is not None else min(8, os.cpu_count() or 1)


def _train(args: TrainArgs, hparams: dict[str, Any], runtime: Runtime, run_dir: Path, speed: Speed | None = None) -> None:
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    speed = (speed or Speed()).on(runtime.cuda)
    workers = default_workers(args)

    dataset = load_data(args, speed, workers=workers)
    steps = args.steps if args.steps is not None else dataset.N_STEPS
    freq = args.checkpoint_freq or dataset.CHECKPOINT_FREQ
    train_envs = [i for i in range(len(dataset.envs)) if i not in args.test_envs]
    train_splits, splits, index_record = make_splits(dataset, args, hparams, speed.eval_augment or args.eval_augment)
    record_args = {**dataclasses.asdict(args), "protocol": protocol_settings(runtime, speed, args, dataset)}
    track = ALGORITHMS.get(args.algorithm).TRACK
    if track != "DG":  # labelled in every table (collect reads it from the args)
        record_args["track"] = track
    if runtime.is_main:
        runfiles.write_splits(run_dir, index_record, f"{dataset.name}_trial{args.trial_seed}_holdout{args.holdout_fraction}")
        print(f"{args.algorithm} on {dataset.name}, test envs {args.test_envs}, {steps} steps, hparams {hparams}")

    algorithm = ALGORITHMS.get(args.algorithm)(dataset.input_shape, dataset.num_classes, len(train_envs), hparams)
    costs, metrics = CostMeter(), MetricMeter()
    batch_size = hparams["batch_size"]
    context = TrainingContext(
        dataset, train_envs, list(args.test_envs), train_splits, hparams, args, runtime.device, costs,
        Path(args.data_dir) / ".dfbench_cache", metrics=metrics, made_by=str(run_dir.resolve()),
        steps_per_epoch=min(len(s) / batch_size for s in train_splits), autocast=runtime.accelerator.autocast,
        heartbeat=(lambda: runfiles.heartbeat(run_dir)) if runtime.is_main else (lambda: None), is_main=runtime.is_main)
    train_splits = set_up(algorithm, context, list(splits.values()), runtime, speed)
    if runtime.is_main and context.previews:
        write_previews(run_dir, context.previews)

    start_step, elapsed_before, diverged_at = 0, 0.0, None
    resume_path = run_dir / runfiles.RESUME
    state = runfiles.load_resume(resume_path, map_location=runtime.device)
    if state is not None:
        restored = algorithm.load_resume_state(state["algorithm"], context)
        if restored is not None:
            train_splits = list(restored)
            data_to_device(train_splits, runtime.device, speed)
        costs.load_state_dict(state["costs"])
        metrics.load_state_dict(state.get("metrics", {}))
        _set_rng_state(state["rng"])
        start_step, elapsed_before = state["step"] + 1, state["elapsed"]
        diverged_at = state.get("diverged_at")
        if runtime.is_main:
            runfiles.keep_records_through(run_dir, state["step"])
            print(f"resuming from step {start_step}")
    elif runtime.is_main:
        # killed after a record but before its resume point: those records are redone from step 0
        runfiles.keep_records_through(run_dir, -1)

    eval_bs = args.eval_batch_size or (1024 if runtime.cuda else 256)

    def batches_from(step: int):
        return training_batches(train_splits, batch_size, args.seed, step, num_workers=workers,
                                pin_memory=speed.pin_memory, rank=runtime.rank, world=runtime.world,
                                device=runtime.device, per_domain_loaders=speed.per_domain_loaders)

    batches = batches_from(start_step)
    steps_per_epoch = context.steps_per_epoch  # of the real in-splits, whatever synthetic data is added
    eval_names = splits_to_evaluate(len(dataset.envs), args.test_envs, args.eval_splits)

    sums: dict[str, torch.Tensor] = {}
    timing = {"step": 0.0, "data": 0.0, "n": 0, "images": 0}
    run_start = time.perf_counter()
    for step in range(start_step, steps):
        replaced = algorithm.on_step(step, context)
        if replaced is not None:  # e.g. a refreshed synthetic pool: batches from this step on come from it
            train_splits = list(replaced)
            data_to_device(train_splits, runtime.device, speed)
            batches = batches_from(step)
        t0 = time.perf_counter()
        minibatches = [(model_input(x, runtime, speed.channels_last), y.to(runtime.device, non_blocking=True))
                       for x, y in next(batches)]
        t1 = time.perf_counter()
        with runtime.accelerator.autocast():
            terms = algorithm.update(minibatches)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + torch.as_tensor(value, dtype=torch.float32).detach()
        if runtime.cuda and (step + 1) % 50 == 0:
            torch.cuda.synchronize()  # keep step_time honest without syncing every step
        t2 = time.perf_counter()
        timing["step"] += t2 - t0
        timing["data"] += t1 - t0
        timing["n"] += 1
        timing["images"] += sum(len(y) for _, y in minibatches) * runtime.world

        if step % freq == 0 or step == steps - 1:
            n = max(timing["n"], 1)
            losses = {name: runtime.mean_over_ranks(total / n).item() for name, total in sums.items()}
            if diverged_at is None and not all(np.isfinite(v) for v in losses.values()):
                diverged_at = step  # DomainBed keeps a diverged run's checkpoints in selection: so do we
                print(f"warning: loss became non-finite by step {step} ({args.algorithm}, lr={hparams['lr']}): the run "
                      "diverged; it goes on as in DomainBed and its records say diverged_at", file=sys.stderr)
            record = {
                "step": step,
                "epoch": step / steps_per_epoch,
                **losses,
                "step_time": timing["step"] / n,
                "data_time": timing["data"] / n,
                "images_per_s": timing["images"] / max(timing["step"], 1e-9),
            }
            for name in eval_names:
                record[f"{name}_acc"] = accuracy(algorithm, splits[name], runtime, eval_bs, min(workers, 4), speed)
            elapsed = elapsed_before + time.perf_counter() - run_start
            record.update(mem_gb=runtime.peak_memory_gb(), wall_time=elapsed, hparams=hparams, args=record_args)
            record.update(costs.record_fields())
            record.update(metrics.record_fields())
            if diverged_at is not None:
                record["diverged_at"] = diverged_at
            if runtime.is_main:
                runfiles.append_record(run_dir, record)
                accs = " ".join(f"{k[:-4]}={v:.3f}" for k, v in record.items() if k.endswith("_acc"))
                print(f"step {step:5d}  loss {losses.get('loss', float('nan')):.4f}  {accs}  "
                      f"{record['images_per_s']:.0f} img/s")
                state = {"step": step, "elapsed": elapsed, "algorithm": algorithm.resume_state(),
                         "costs": costs.state_dict(), "metrics": metrics.state_dict(), "rng": _rng_state(),
                         "diverged_at": diverged_at}
                runfiles.save_resume(resume_path, state)
                runfiles.heartbeat(run_dir)
            sums, timing = {}, {"step": 0.0, "data": 0.0, "n": 0, "images": 0}

    runtime.accelerator.wait_for_everyone()
    if runtime.is_main:
        if not args.skip_model_save:
            torch.save({"args": record_args, "model_input_shape": dataset.input_shape,
                        "model_num_classes": dataset.num_classes, "model_num_domains": len(train_envs),
                        "model_hparams": hparams, "model_dict": algorithm.state_dict()}, run_dir / runfiles.MODEL)
        runfiles.atomic_write_text(run_dir / runfiles.DONE, "done\n")
        resume_path.unlink(missing_ok=True)
