"""dfbench bench, synthetic-pacs, and the fast path (uint8 store, batched augmentation), on tiny data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from domainfusion_bench.bench import PROFILES, BenchOptions, bench_collector, format_report, run_bench
from domainfusion_bench.cli import main
from domainfusion_bench.data import get_dataset
from domainfusion_bench.data.folder import PACS, AugmentBatch, NormalizeBatch
from domainfusion_bench.data.loaders import training_batches
from domainfusion_bench.data.synthetic import CLASSES, generate
from domainfusion_bench.errors import DfbenchError
from domainfusion_bench.training import Speed, TrainArgs, make_splits, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root / "synthetic_pacs", per_class=2)
    return root


def test_synthetic_pacs_has_pacs_shape(data_dir):
    ds = get_dataset("synthetic-pacs", data_dir)
    assert ds.domains == list(PACS.DOMAINS) and ds.classes == sorted(CLASSES) and ds.num_classes == 7
    assert ds.sizes() == [14, 14, 14, 14] and ds.input_shape == (3, 224, 224)
    path, _ = ds.envs[2].samples[0]
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == (227, 227) and img.mode == "RGB"


def test_synthetic_pacs_is_written_once_and_rewritten_on_a_new_request(data_dir, tmp_path):
    root = generate(tmp_path / "sp", per_class=1)
    first = next(root.rglob("*.jpg"))
    stamp = first.stat().st_mtime_ns
    generate(root, per_class=1)
    assert first.stat().st_mtime_ns == stamp
    generate(root, per_class=2)
    assert len(list(root.rglob("*.jpg"))) == 4 * 7 * 2
    with pytest.raises(DfbenchError, match="at least 1 image"):
        generate(tmp_path / "empty", per_class=0)


def stored(data_dir, resolution=32):
    ds = get_dataset("synthetic-pacs", data_dir)
    ds.set_resolution(resolution)
    plain = [ds.eval_transform()(ds.envs[1][k][0]) for k in range(3)]
    ds.load_store(data_dir / ".dfbench_cache")
    return ds, torch.stack(plain)


def test_store_evaluates_exactly_as_the_per_image_path(data_dir):
    ds, plain = stored(data_dir)
    x = ds.envs[1].tensors[0][:3]
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32)
    assert torch.equal(NormalizeBatch()(x), plain)  # same values as Resize + ToTensor + Normalize
    assert torch.equal(torch.stack([ds.eval_transform()(xi) for xi in x]), plain)
    assert ds.train_transform(True)(x[0]).shape == (3, 32, 32)  # per-item path still works for algorithms
    again, _ = stored(data_dir)  # second load comes from the cache file
    assert torch.equal(again.envs[3].tensors[0], ds.envs[3].tensors[0])


def test_batched_augmentation_is_seeded_and_changes_images(data_dir):
    ds, _ = stored(data_dir)
    x = ds.envs[0].tensors[0]
    aug = AugmentBatch(32)
    a = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == (14, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(2)))
    assert not torch.allclose(a, NormalizeBatch()(x))


def test_batched_jitter_matches_torchvision_per_image(monkeypatch):
    """Each ColorJitter op on a batch, with one factor per image, equals torchvision's op on each image."""
    from torchvision.transforms.v2 import functional as F2

    from domainfusion_bench.data import augment

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    f = torch.tensor([0.75, 1.0, 1.2, 1.3])
    ops = {0: F2.adjust_brightness, 1: F2.adjust_contrast, 2: F2.adjust_saturation}
    for op, fn in ops.items():
        expected = torch.stack([fn(xi, float(fi)) for xi, fi in zip(x, f)])
        assert torch.allclose(AugmentBatch._jitter(x, op, f[:, None, None, None]), expected, atol=1e-5)
    hue = torch.tensor([0.1, -0.2, 0.3, 0.0])
    expected = torch.stack([F2.adjust_hue(xi, float(h)) for xi, h in zip(x, hue)])
    assert torch.allclose(AugmentBatch._jitter(x, 3, hue[:, None, None, None]), expected, atol=1e-5)
    monkeypatch.setattr(augment, "_rgb_to_hsv", None)  # torchvision's private HSV helpers gone: same result
    assert torch.allclose(AugmentBatch._jitter(x, 3, hue[:, None, None, None]), expected, atol=1e-5)


def test_stored_batches_resume_exactly(data_dir):
    """Batches (indices and augmentation) depend on (seed, domain, step) only: a resumed run sees the same."""
    ds, _ = stored(data_dir)
    args = TrainArgs(dataset="synthetic-pacs", test_envs=[0])
    train_splits, splits, _ = make_splits(ds, args, {"data_augmentation": True})
    assert all(s.tensor_view() is not None and s.batch_transform is not None for s in train_splits)
    stream = training_batches(train_splits, 4, seed=3)
    third = [next(stream) for _ in range(3)][-1]
    resumed = next(training_batches(train_splits, 4, seed=3, start_step=2))
    for (x, y), (rx, ry) in zip(third, resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry) and x.dtype == torch.float32


def test_eval_augment_puts_the_training_transform_on_training_domains(data_dir):
    ds = get_dataset("synthetic-pacs", data_dir)
    args = TrainArgs(dataset="synthetic-pacs", test_envs=[0])
    _, plain, _ = make_splits(ds, args, {"data_augmentation": True})
    _, augmented, _ = make_splits(ds, args, {"data_augmentation": True}, eval_augment=True)
    assert plain["env1_out"].transform is plain["env0_in"].transform  # the eval transform everywhere
    assert augmented["env1_out"].transform is augmented["env1_in"].transform is not augmented["env0_out"].transform


def test_training_run_uses_the_store(data_dir, tmp_path):
    args = TrainArgs(dataset="synthetic-pacs", data_dir=str(data_dir), test_envs=[0], steps=2, checkpoint_freq=1,
                     output_dir=str(tmp_path / "run"), device="cpu", num_workers=0, skip_model_save=True,
                     hparams=json.dumps({"backbone": "cnn", "cnn_width": 16, "batch_size": 2}))
    run = train(args)
    records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert "image store" in (run / "out.txt").read_text()
    assert list((data_dir / ".dfbench_cache").glob("images_224px_*.npy"))


def tiny_options(data_dir, **changes):
    base = dict(dataset="synthetic-pacs", backbone="resnet18", resolution=32, batch_size=2, steps=2, warmup=1,
                device="cpu", data_dir=str(data_dir), profiles=["fast", "domainbed"], num_workers=0, threads=1)
    base.update(changes)
    return BenchOptions(**base)


def test_bench_measures_both_profiles(data_dir):
    report = run_bench(tiny_options(data_dir))
    fast, domainbed = report["profiles"]
    for r in (fast, domainbed):
        for key in ("train_images_per_s", "ceiling_images_per_s", "eval_images_per_s", "peak_memory_gb"):
            assert r[key] > 0, key
        assert 0 < r["train_over_ceiling"] <= 2.0  # a few steps on a shared CPU: loose, but not nonsense
        assert r["images_per_step"] == 2 * 3 and r["resolution"] == 32 and r["backbone"] == "resnet18"
    assert fast["eval_images"] == 3 * 2 + 12 + 2  # train domains' out + test domain's in and out
    assert domainbed["eval_images"] == 4 * 14  # every split
    assert report["fast_over_domainbed"] > 0 and report["machine"]["torch_threads"] == 1
    text = format_report(report)
    assert "(a)/(b)" in text and "fast / domainbed" in text


def test_profile_switch_changes_the_settings(data_dir):
    report = run_bench(tiny_options(data_dir, backbone="cnn", hparams='{"cnn_width": 16}'))
    fast, domainbed = (r["settings"] for r in report["profiles"])
    assert fast == {"precision": "fp32", "channels_last": False, "pin_memory": False, "image_store": True,
                    "workers": "0 shared", "eval_batch_size": 256, "eval_splits": "needed", "eval_augment": False}
    assert domainbed == {"precision": "fp32", "channels_last": False, "pin_memory": False, "image_store": False,
                         "workers": "0 per training domain", "eval_batch_size": 64, "eval_splits": "all",
                         "eval_augment": True}
    db = PROFILES["domainbed"]  # without the test's worker override: DomainBed's 8 per loader
    assert db.num_workers == 8 and db.precision == "fp32" and db.speed == Speed.domainbed()
    assert PROFILES["fast"].precision == "auto" and PROFILES["fast"].speed == Speed()


def test_cli_json_output_parses(data_dir, capsys):
    main(["bench", "--data_dir", str(data_dir), "--backbone", "cnn", "--hparams", '{"cnn_width": 16}',
          "--resolution", "32", "--batch_size", "2", "--steps", "2", "--warmup", "0", "--device", "cpu",
          "--num_workers", "0", "--threads", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["profile"] for r in report["profiles"]] == ["fast"] and report["profiles"][0]["train_images_per_s"] > 0


def test_bad_bench_input_is_one_clear_error(data_dir, capsys):
    with pytest.raises(DfbenchError, match="unknown profile"):
        run_bench(tiny_options(data_dir, profiles=["turbo"]))
    with pytest.raises(DfbenchError, match="fixed input size"):
        run_bench(tiny_options(data_dir, dataset="RotatedDigits"))
    with pytest.raises(SystemExit):
        main(["bench", "--algorithm", "NoSuch", "--data_dir", str(data_dir)])
    assert "unknown algorithm 'NoSuch'" in capsys.readouterr().err


def test_collector_bench_reads_every_generated_record(tmp_path, capsys):
    result = bench_collector(200, tmp_path)
    assert result["records"] == result["runs"] * 18 >= 200
    assert result["load_seconds"] > 0 and result["select_and_tables_seconds"] > 0 and result["table_lines"] > 10
    main(["bench", "--collect", "40", "--json"])
    assert json.loads(capsys.readouterr().out)["records"] == 54
