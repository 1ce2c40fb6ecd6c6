"""What generative methods keep for previews/: the strips, their metadata and index.json, the oracle
row's held-out target, and the +OG rows' unguided and per-round redraws of the very same requests."""

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from domainfusion_bench import runfiles
from domainfusion_bench.algorithms.generative import GenerativeAlgorithm
from domainfusion_bench.algorithms.oracle_guidance import OracleGuided
from domainfusion_bench.algorithms.previews import PREVIEW_IMAGES, keep_preview, pick
from domainfusion_bench.diffusion.cache import Request
from domainfusion_bench.diffusion.oracle_guidance import ImageValidityClassifier, OracleGuidanceResult, ValidityGuidance
from domainfusion_bench.report.gallery import tiles

DOMAINS = ["plain", "inverted", "sketch", "stencil"]


def requests_from(env, targets, n_sources=6):
    """As CDGA makes them: per source image, one request toward each target (full mix: {target: 1})."""
    return [Request(class_id=s % 3, domains={t: 1.0}, seed=100 * s + t, source=torch.full((1, 4, 4), s / 10),
                    source_domain=env) for s in range(n_sources) for t in targets]


def fake(oracle=False, variants=lambda ctx, sampler, chosen, strength: []):
    alg = SimpleNamespace(ORACLE=oracle, hparams={"og_measure": False}, to_uint8=GenerativeAlgorithm.to_uint8,
                          preview_variants=variants)
    ctx = SimpleNamespace(previews=[], dataset=SimpleNamespace(domains=DOMAINS), test_envs=[0], made_by="")
    return alg, ctx


def images_for(requests):
    return torch.stack([torch.full((1, 4, 4), r.seed % 256, dtype=torch.uint8) for r in requests])


def test_the_oracle_row_previews_its_held_out_target_and_others_one_target_with_distinct_sources():
    reqs = requests_from(1, [2, 3, 0])
    assert [reqs[i].domains for i in pick(reqs, [0], oracle=True)] == [{0: 1.0}] * 6
    plain = pick(reqs, [0], oracle=False)
    assert [reqs[i].domains for i in plain] == [{2: 1.0}] * 6
    assert len({reqs[i].seed // 100 for i in plain}) == 6  # six different source images
    alg, ctx = fake(oracle=True)
    keep_preview(alg, ctx, images_for(reqs), 1, requests=reqs, sampler=SimpleNamespace(guidance=[]), strength=0.5)
    (strip,) = ctx.previews
    assert strip.kind == "img2img" and strip.oracle_target and strip.target == "plain" and strip.domain == "inverted"
    assert len(strip.images) == 6 and strip.images[0, 0, 0, 0] == reqs[2].seed % 256
    assert torch.equal(strip.sources[0], torch.full((1, 4, 4), 0, dtype=torch.uint8))  # source 0 -> 0/10
    # pure samples have no sources; a second batch of the same stage and domain keeps the first
    alg, ctx = fake()
    pure = [Request(class_id=0, domains={}, seed=s) for s in range(10)]
    keep_preview(alg, ctx, images_for(pure), 1, requests=pure, sampler=SimpleNamespace(guidance=[]), target="toward x")
    keep_preview(alg, ctx, images_for(pure) + 1, 1, requests=pure, sampler=SimpleNamespace(guidance=[]))
    (strip,) = ctx.previews
    assert strip.kind == "pure" and strip.sources is None and strip.target == "toward x" and not strip.oracle_target


class FakeOG:
    registered_name = "CDGA+OG"


def og_algorithm(distilled=True, rounds=2):
    classifiers = [ImageValidityClassifier(1, 3, 4) for _ in range(rounds)]
    alg = FakeOG()
    alg._og_result = OracleGuidanceResult(classifiers, ImageValidityClassifier(1, 3, 4) if distilled else None, [], 1.0)
    return alg


def test_og_rows_redraw_the_same_requests_unguided_and_per_round():
    alg = og_algorithm()
    calls = []

    def generate(sampler, requests, strength, **kw):
        calls.append((len(sampler.guidance), [r.seed for r in requests], strength))
        return images_for(requests) + len(sampler.guidance), None

    ctx = SimpleNamespace(generations=SimpleNamespace(generate=generate), made_by="")
    other = object()  # e.g. TGDP's density-ratio term: kept at every level
    final = [other, ValidityGuidance(alg._og_result.distilled, 1.0, "og-CDGA+OG-distilled")]
    sampler = SimpleNamespace(backbone=None, config=None, guidance=final)
    reqs = requests_from(1, [2])[:5]
    out = OracleGuided.preview_variants(alg, ctx, sampler, reqs, 0.5)
    assert [og for og, _, _ in out] == ["unguided", "round1", "round2", "distilled"]
    assert [c[0] for c in calls] == [1, 2, 3]  # the other term, plus 0, 1, 2 round classifiers
    assert all(c[1] == [r.seed for r in reqs] and c[2] == 0.5 for c in calls)  # the same requests and strength
    assert out[-1][1] is None  # the training images are the distilled level: not drawn again
    # without distillation the last round is the training guidance
    alg = og_algorithm(distilled=False)
    calls.clear()
    out = OracleGuided.preview_variants(alg, ctx, SimpleNamespace(backbone=None, config=None, guidance=[]), reqs, 0.5)
    assert [og for og, _, _ in out] == ["unguided", "round1", "round2"] and out[-1][1] is None and len(calls) == 2


def test_og_strips_share_their_sources_and_group_and_are_written_with_the_index(tmp_path):
    reqs = requests_from(2, [1, 3], n_sources=10)
    training = images_for(reqs)
    asked = []

    def variants(ctx, sampler, chosen, strength):  # as OracleGuided's: the chosen requests drawn per level
        asked.append(chosen)
        return [("unguided", images_for(chosen) + 1, []), ("round1", images_for(chosen) + 2, ["ValidityGuidance"]),
                ("distilled", None, ["V"])]

    alg, ctx = fake(variants=variants)
    keep_preview(alg, ctx, training, 2, requests=reqs, sampler=SimpleNamespace(guidance=[]), strength=0.5)
    assert [s.og for s in ctx.previews] == ["unguided", "round1", "distilled"]
    assert len({s.group for s in ctx.previews}) == 1
    assert all(torch.equal(s.sources, ctx.previews[0].sources) for s in ctx.previews)
    idx = pick(reqs, [0], oracle=False)
    assert asked == [[reqs[i] for i in idx]]
    assert torch.equal(ctx.previews[-1].images, training[idx]) and torch.equal(ctx.previews[0].images, training[idx] + 1)

    ctx.previews[0].valid = [k != 2 for k in range(PREVIEW_IMAGES)]
    runfiles.write_previews(tmp_path, ctx.previews)
    index = json.loads((tmp_path / runfiles.PREVIEWS / "index.json").read_text())["strips"]
    assert [(s["og"], s["kind"], s["domain"], s["target"], s["n"]) for s in index] == \
        [(og, "img2img", "sketch", "inverted", PREVIEW_IMAGES) for og in ("unguided", "round1", "distilled")]
    assert index[0]["valid"][2] is False and index[1]["valid"] is None
    assert {s["sources_file"] for s in index} == {"base-sketch.sources.png"}  # one file for the group's sources
    assert runfiles.read_previews(tmp_path) == index
    cut = tiles(tmp_path / runfiles.PREVIEWS / index[-1]["file"], index[-1]["n"])
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(cut[1]))))
    assert first.shape == (4, 4) and (first == int(training[idx][1, 0, 0, 0])).all()  # the reader cuts them apart


def test_bad_preview_strips_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of img2img, pure"):
        runfiles.PreviewStrip(np.zeros((2, 1, 4, 4), np.uint8), "base", "plain", kind="noise")
    with pytest.raises(ValueError, match="1 validity judgements for 2 preview images"):
        runfiles.PreviewStrip(np.zeros((2, 1, 4, 4), np.uint8), "base", "plain", valid=[True])
    with pytest.raises(ValueError, match="must be uint8"):
        runfiles.write_previews(tmp_path, [runfiles.PreviewStrip(np.zeros((2, 1, 4, 4), np.float32), "b", "p")])



def test_a_method_without_keep_preview_still_shows_its_images_and_keep_preview_replaces_them():
    alg, ctx = fake()
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    GenerativeAlgorithm.after_generation(alg, ctx, images, torch.zeros(10), 1)
    (strip,) = ctx.previews
    assert (strip.kind, strip.domain, len(strip.images)) == ("unknown", "inverted", PREVIEW_IMAGES)
    reqs = requests_from(1, [2])
    keep_preview(alg, ctx, images_for(reqs), 1, requests=reqs, sampler=SimpleNamespace(guidance=[]), strength=0.5)
    assert [s.kind for s in ctx.previews] == ["img2img"]  # the described strip, not both
    # once the stage keeps described strips, its other domains' batches add no undescribed ones (TGDP-FS
    # keeps one shared strip, then hands each training domain its share)
    GenerativeAlgorithm.after_generation(alg, ctx, images, torch.zeros(10), 2)
    assert [s.kind for s in ctx.previews] == ["img2img"]
