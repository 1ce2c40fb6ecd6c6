"""DomainBed's training augmentation, batched on the device for images in the uint8 store.

RandomResizedCrop(scale 0.7-1), horizontal flip, ColorJitter(0.3 x4, in an order drawn per image) and
RandomGrayscale(0.1), every parameter drawn per image from a seeded generator. Crop boxes follow
torchvision's rule on each image's original size and are resampled from the store's crop copy, which
is large enough (``crop_source_size``) that every crop keeps the detail of the original image.
"""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

try:  # batched per-sample hue needs torchvision's HSV helpers; they are private, so they may move
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
except ImportError:
    _hsv_to_rgb = _rgb_to_hsv = None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DomainBed's training augmentation parameters (DESIGN.md section 3)
CROP_SCALE, CROP_RATIO, JITTER, GRAY_P = (0.7, 1.0), (3 / 4, 4 / 3), 0.3, 0.1


class NormalizeBatch:
    """uint8 [N, 3, H, W] -> normalised float: the same ops as ToTensor + Normalize, so the same values."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return T.functional.normalize(x.float().div(255), IMAGENET_MEAN, IMAGENET_STD)


CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop


def crop_params(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator | None = None,
                scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes (i, j, h, w) per image, by torchvision's own rule on each image's size:
    area fraction ~ U(scale), log aspect ~ U(log ratio), w and h rounded, up to 10 tries for a box that
    fits, then the centre crop with the aspect clamped into ``ratio``; the corner uniform over integer
    positions. Vectorised over images (all tries drawn at once); returns float [N, 4]."""
    n, device = len(heights), heights.device
    H, W = heights.double()[:, None], widths.double()[:, None]
    u = lambda *shape: torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u(n, CROP_TRIES))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u(n, CROP_TRIES))
    w, h = torch.round((area * aspect).sqrt()), torch.round((area / aspect).sqrt())
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.where(fits.any(1), fits.double().argmax(1), torch.full((n,), -1, device=device))
    take = first.clamp(min=0)[:, None]
    w, h = w.gather(1, take)[:, 0], h.gather(1, take)[:, 0]
    H, W = H[:, 0], W[:, 0]
    i = torch.floor(u(n) * (H - h + 1))
    j = torch.floor(u(n) * (W - w + 1))
    # fallback: centre crop, aspect clamped into [ratio[0], ratio[1]]
    in_ratio = W / H
    fw = torch.where(in_ratio < ratio[0], W, torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W))
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fall = first < 0
    h, w = torch.where(fall, fh, h), torch.where(fall, fw, w)
    i = torch.where(fall, torch.div(H - h, 2, rounding_mode="floor"), i)
    j = torch.where(fall, torch.div(W - w, 2, rounding_mode="floor"), j)
    return torch.stack([i, j, h, w], 1).float()


class AugmentBatch:
    """DomainBed's training augmentation on a uint8 batch, on its device, with per-image parameters.

    Parameters are drawn for the whole global batch (``original_sizes``: its images' (height, width)
    in the original files) and ``part`` of them applied to ``x``, this rank's slice: under DDP every
    image gets the draw it gets in one process. Boxes are drawn in original pixels (``crop_params``),
    mapped onto ``x`` (the store's crop copy: the original itself when it fits, see ``crop_source_size``)
    and resized one image at a time with antialiasing, as PIL's bilinear resize does (a batched
    ``roi_align`` does not antialias: on a noise image it leaves 20-30% more pixel-level detail)."""

    RANDOM = True  # the loaders pass the global batch's sizes and this rank's part

    def __init__(self, resolution: int):
        self.resolution = resolution

    def draw(self, original_sizes: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-image parameters for images of these original (height, width): crop boxes (i, j, h, w),
        flip, jitter factors (brightness, contrast, saturation, hue), jitter order, grayscale."""
        n, device = len(original_sizes), original_sizes.device
        u = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
        sizes = original_sizes.double()
        crops = crop_params(sizes[:, 0], sizes[:, 1], generator)
        flip = u(n) < 0.5
        factors = torch.stack([1 - JITTER + 2 * JITTER * u(n) for _ in range(3)] + [JITTER * (2 * u(n) - 1)], 1)
        order = u(n, 4).argsort(1)  # a uniform permutation per image, as torchvision's randperm(4)
        gray = u(n) < GRAY_P
        return {"crops": crops, "flip": flip, "factors": factors, "order": order, "gray": gray}

    def boxes(self, x: torch.Tensor, crops: torch.Tensor, original_sizes: torch.Tensor) -> torch.Tensor:
        """Boxes (index, x0, y0, x1, y1) on ``x`` for crops (i, j, h, w) in original pixels."""
        n, _, h, w = x.shape
        orig = original_sizes.to(x.device).double()
        i, j, ch, cw = crops.to(x.device).double().unbind(1)
        sy, sx = h / orig[:, 0], w / orig[:, 1]  # original pixels -> stored pixels
        return torch.stack([torch.arange(n, device=x.device, dtype=torch.float64), j * sx, i * sy, (j + cw) * sx,
                            (i + ch) * sy], 1).to(torch.float32)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 original_sizes: torch.Tensor | None = None, part: slice = slice(None)) -> torch.Tensor:
        if original_sizes is None:
            original_sizes = torch.tensor([x.shape[-2:]], dtype=torch.long).expand(len(x), 2)
        p = {k: v[part] for k, v in self.draw(original_sizes.to(x.device), generator).items()}
        if len(p["flip"]) != len(x):
            raise ValueError(f"AugmentBatch: {len(x)} images but {len(p['flip'])} draws for this part of the batch; "
                             f"original_sizes must cover the whole batch that ``part`` slices")
        sizes = original_sizes.to(x.device)[part]
        boxes = self.boxes(x, p["crops"], sizes)[:, 1:].round().long().tolist()
        side = [self.resolution, self.resolution]
        x = torch.stack([F2.resized_crop(xi, y0, x0, max(y1 - y0, 1), max(x1 - x0, 1), side, antialias=True)
                         for xi, (x0, y0, x1, y1) in zip(x.float().div(255), boxes)])
        x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x)
        for position in range(4):  # each image's jitter ops in its own order
            for op in range(4):
                rows = (p["order"][:, position] == op).nonzero().flatten()
                if len(rows):
                    x[rows] = self._jitter(x[rows], op, p["factors"][rows, op][:, None, None, None])
        gray = F2.rgb_to_grayscale(x, num_output_channels=3)
        x = torch.where(p["gray"][:, None, None, None], gray, x)
        return T.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    @staticmethod
    def _jitter(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
        if op == 0:  # brightness
            return (x * f).clamp(0, 1)
        if op == 1:  # contrast: blend with the mean grey level
            mean = F2.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
            return (f * x + (1 - f) * mean).clamp(0, 1)
        if op == 2:  # saturation: blend with the grey image
            return (f * x + (1 - f) * F2.rgb_to_grayscale(x)).clamp(0, 1)
        if _rgb_to_hsv is None:  # hue, one sample at a time through the public API
            return torch.stack([F2.adjust_hue(xi, float(fi)) for xi, fi in zip(x, f.flatten())])
        hsv = _rgb_to_hsv(x)  # hue: rotate H
        hsv = torch.cat([(hsv[:, :1] + f).remainder(1.0), hsv[:, 1:]], 1)
        return _hsv_to_rgb(hsv)


def crop_source_size(resolution: int, largest_side: int) -> int:
    """Side of the store's crop copy: the originals' own size when they are at most 2 x resolution / 0.7
    px (640 for 224; PACS's 227 px images are kept as they are, so their crops are DomainBed's), else
    that cap. A crop spans >= 0.7 of each side, so at the cap it still has >= 2 x resolution source
    pixels per side; what the copy's own resize loses then is in the README's differences table."""
    return min(math.ceil(2 * resolution / CROP_SCALE[0]), int(largest_side))
