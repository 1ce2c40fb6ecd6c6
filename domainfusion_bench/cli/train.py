"""``dfbench train``, ``dfbench diffusion train`` and ``dfbench diti probe``: one run, or one helper model."""

from __future__ import annotations

import dataclasses


def _train_parser(sub) -> None:
    from domainfusion_bench.training import TrainArgs

    d = TrainArgs()
    p = sub.add_parser("train", help="train one run (DomainBed's train.py flags)")
    p.add_argument("--data_dir", default=d.data_dir, help="root of the datasets (default: %(default)s, or $DFBENCH_DATA)")
    p.add_argument("--dataset", default=d.dataset, help="registered name, or folder:<path> (see `dfbench list`)")
    p.add_argument("--algorithm", default=d.algorithm)
    p.add_argument("--test_envs", type=int, nargs="+", default=d.test_envs, help="held-out domain indices")
    p.add_argument("--hparams", default=None, help='JSON overrides, e.g. \'{"lr": 1e-4}\'')
    p.add_argument("--hparams_seed", type=int, default=d.hparams_seed, help="0 = defaults, else a random draw")
    p.add_argument("--trial_seed", type=int, default=d.trial_seed, help="seeds the splits and the hparam draw")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds everything else")
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's (5001)")
    p.add_argument("--checkpoint_freq", type=int, default=None, help="default: the dataset's (300, 100 MNIST-sized)")
    p.add_argument("--holdout_fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--output_dir", default=d.output_dir)
    p.add_argument("--skip_model_save", action="store_true")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels, no cudnn autotuning")
    p.add_argument("--eval_splits", choices=["needed", "all"], default=d.eval_splits,
                   help="needed: only what model selection reads; all: every in/out split")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision, help="auto: bf16 on CUDA")
    p.add_argument("--num_workers", type=int, default=None, help="data workers shared by all domains")
    p.add_argument("--eval_batch_size", type=int, default=None)
    p.add_argument("--plugins", nargs="*", default=[], help="Python files that register algorithms")
    p.add_argument("--eval_augment", action="store_true",
                   help="evaluate training domains' splits with the training transform (DomainBed's way)")
    p.add_argument("--no_image_store", action="store_true",
                   help="decode and augment folder datasets per image with PIL (DomainBed's way), not from the uint8 store")
    p.set_defaults(func=_run_train)


def _run_train(ns) -> None:
    from domainfusion_bench.training import TrainArgs, train

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    train(TrainArgs(**{k: v for k, v in vars(ns).items() if k in fields}))


def _diffusion_parser(sub) -> None:
    p = sub.add_parser("diffusion", help="diffusion backbones: train the small pixel DDPM generative methods use")
    dsub = p.add_subparsers(dest="diffusion_command", required=True)
    t = dsub.add_parser("train", help="train (or find in the cache) the pixel DDPM for a dataset's training domains")
    t.add_argument("--dataset", required=True, help="registered name, or folder:<path>")
    t.add_argument("--test_envs", type=int, nargs="+", required=True, help="held-out domains: never seen by the model")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: what CDGA uses, so its runs reuse it)")
    t.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    t.add_argument("--cache_dir", default=None, help="default: <data_dir>/.dfbench_cache (where training runs look)")
    t.add_argument("--trial_seed", type=int, default=0, help="seeds the in/out splits (train on in-splits only)")
    t.add_argument("--holdout_fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--preview", default=None, metavar="PNG", help="also write a grid of samples (class x domain)")
    t.set_defaults(func=_run_diffusion_train)


def _run_diffusion_train(ns) -> None:
    from domainfusion_bench.diffusion.factory import train_command
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    train_command(ns.dataset, ns.data_dir or DEFAULT_DATA_DIR, ns.test_envs, steps=ns.steps, cache_dir=ns.cache_dir,
                  trial_seed=ns.trial_seed, holdout_fraction=ns.holdout_fraction, device=ns.device, preview=ns.preview)


def _diti_parser(sub) -> None:
    p = sub.add_parser("diti", help="DiTi features: which time-step slices of z carry class and which carry domain")
    dsub = p.add_subparsers(dest="diti_command", required=True)
    t = dsub.add_parser("probe", help="linear probes per slice of z (fit on training in-splits, scored on their out-splits)")
    t.add_argument("--dataset", required=True, help="registered name, or folder:<path>")
    t.add_argument("--test_envs", type=int, nargs="+", required=True, help="held-out domains: never read")
    t.add_argument("--hparams", default=None, help="DiTi hyperparameters as JSON (the encoder of runs with the same ones)")
    t.add_argument("--data_dir", default=None, help="root of the datasets (default: datasets, or $DFBENCH_DATA)")
    t.add_argument("--cache_dir", default=None, help="default: <data_dir>/.dfbench_cache (where training runs look)")
    t.add_argument("--trial_seed", type=int, default=0)
    t.add_argument("--holdout_fraction", type=float, default=0.2)
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    t.set_defaults(func=_run_diti_probe)


def _run_diti_probe(ns) -> None:
    from domainfusion_bench.algorithms.diti import probe_report
    from domainfusion_bench.paths import DEFAULT_DATA_DIR

    probe_report(ns.dataset, ns.data_dir or DEFAULT_DATA_DIR, ns.test_envs, hparams_json=ns.hparams,
                 trial_seed=ns.trial_seed, holdout_fraction=ns.holdout_fraction, cache_dir=ns.cache_dir,
                 device=ns.device, json_out=ns.json)
