"""The run's device, precision and processes (accelerate, DDP), and gradient averaging over ranks."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from domainfusion_bench.algorithms import Algorithm
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training.args import TrainArgs
from domainfusion_bench.training.logs import tracker_names


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
    backward pass, only over trainable parameters (frozen helper models are left out). Parameters a step
    does not use are looked for (``find_unused_parameters``) only for algorithms that say they have some
    (``Algorithm.DDP_FIND_UNUSED``): the search costs a graph traversal per step. An algorithm that
    overrides ``update`` and computes its loss without ``LossStep`` still gets averaged gradients:
    ``backward`` then all-reduces them itself, one flat tensor per bucket.

    Ranks take ``[rank::world]`` of every global minibatch, so with an odd batch their slices differ in
    size; ``backward`` weights each rank's loss by ``loss_weight`` (``set_global_batch``) so that the
    averaged gradient is the gradient of the global batch's mean loss, as in one process.
    """

    def __init__(self, args: TrainArgs):
        from accelerate import Accelerator

        want_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        if not want_cpu and not torch.cuda.is_available():
            raise DfbenchError(f"--device {args.device} asked for CUDA, but torch sees no GPU. Use --device cpu.")
        if args.device.startswith("cuda:") and "LOCAL_RANK" not in os.environ:
            torch.cuda.set_device(int(args.device.split(":")[1]))
        bf16 = args.precision == "bf16" or (args.precision == "auto" and not want_cpu and torch.cuda.is_bf16_supported())
        trackers = tracker_names(getattr(args, "log_with", None))  # --log_with: files under the run dir
        self.accelerator = Accelerator(cpu=want_cpu, mixed_precision="bf16" if bf16 else "no",
                                       log_with=trackers or None, project_dir=args.output_dir if trackers else None)
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
        self.loss_weight = 1.0  # this rank's share of the global batch times world (set_global_batch)

    def set_global_batch(self, batch_size: int, algorithm: Algorithm | None = None) -> None:
        """Weight this rank's loss by its share of a global per-domain batch of ``batch_size`` (the rank
        holds ``len(range(rank, batch_size, world))`` of each domain's examples)."""
        if batch_size < self.world:
            raise DfbenchError(f"batch_size {batch_size} is smaller than the {self.world} processes: some would get "
                               f"no examples. Use batch_size >= {self.world} or fewer processes.")
        share = len(range(self.rank, batch_size, self.world)) / batch_size
        self.loss_weight = algorithm.ddp_loss_weight(share, self.world) if algorithm is not None else share * self.world

    def seed_rank(self, seed: int, step: int) -> None:
        """Give every rank but the main one its own random streams (dropout, mixing draws, loader workers),
        keyed by (seed, rank, step) so a resumed run draws them again; rank 0 keeps the 1-process stream."""
        if self.world > 1 and self.rank > 0:
            import random

            import numpy as np

            from domainfusion_bench.protocol import seed_hash

            key = seed_hash(seed, "rank", self.rank, step)
            random.seed(key)
            np.random.seed(key)
            torch.manual_seed(key)

    def distribute(self, algorithm: Algorithm, params: Sequence[torch.nn.Parameter]) -> None:
        """Under several processes: wrap the algorithm's loss in accelerate's DDP and route its training
        steps through it (``algorithm.loss_step``). One process: nothing changes."""
        if self.world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        from accelerate.utils import DistributedDataParallelKwargs

        # the search for unused parameters walks the autograd graph every step: only where needed
        self.accelerator.ddp_handler = DistributedDataParallelKwargs(
            find_unused_parameters=bool(getattr(algorithm, "DDP_FIND_UNUSED", False)))
        step = LossStep(algorithm)
        trainable = {id(p) for p in params}
        frozen = [f"algorithm.{name}" for name, p in algorithm.named_parameters() if id(p) not in trainable]
        for prefix, module in algorithm.named_modules():  # and the buffers of wholly frozen modules
            own = list(module.parameters())
            if own and not any(id(p) in trainable for p in own):
                frozen += [f"algorithm.{prefix}.{name}".replace("..", ".") for name, _ in module.named_buffers()]
        # frozen helper models (diffusion backbones, validity judges) are neither broadcast nor all-reduced
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
        self.ddp = self.accelerator.prepare(step)

        def loss_step(minibatches):
            self._ddp_armed = True
            return self.ddp(minibatches)

        algorithm.loss_step = loss_step

    def backward(self, loss: torch.Tensor, params: Sequence[torch.nn.Parameter], **kw) -> None:
        """``kw`` (retain_graph, create_graph) goes to ``Tensor.backward``. Under several processes the
        gradients come out averaged over ranks (each rank saw a slice of every minibatch), each rank's loss
        weighted by its share of the global batch."""
        armed, self._ddp_armed = self._ddp_armed, False
        self.accelerator.backward(loss * self.loss_weight if self.loss_weight != 1.0 else loss, **kw)
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

    def batch_mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Per-rank batch means -> the global batch's mean (ranks weighted by their share, as in ``backward``)."""
        if self.world == 1:
            return values
        return self.accelerator.reduce(values.to(self.device) * self.loss_weight, reduction="sum") / self.world

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
