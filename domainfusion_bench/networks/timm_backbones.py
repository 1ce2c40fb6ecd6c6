"""timm backbones as featurizers: ``backbone: "timm:<model name>"`` (any ``timm.list_models()`` name, with
an optional pretrained tag, e.g. ``timm:vit_base_patch16_clip_224.openai``).

``pretrained``: ``imagenet`` loads the model's default pretrained weights from what is already on disk
(the Hugging Face hub cache or torch hub's checkpoints folder): nothing is downloaded here, a missing file
is one error saying where to put it; ``none`` trains from scratch; a file path loads that file (a state
dict, .safetensors or .pth/.bin); a folder path loads the weights file in it (a downloaded hub repo).

The model reads images normalised by the model's pretrained config (timm's ``resolve_data_config``): the
dataset's normalisation is undone and the model's applied inside ``forward`` (a per-channel affine, so the
same as normalising in the transform), and ``describe()`` says which config a run used.

Stages (for MixStyle/EFDM): the modules timm's ``feature_info`` names (``stages.0`` ... for ConvNeXt,
``layer1`` ... for ResNets); a layer inserted after one runs as a forward hook on that module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domainfusion_bench.errors import DfbenchError

PREFIX = "timm:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def _timm():
    try:
        import timm
    except ImportError:
        raise DfbenchError("timm backbones need the timm package: pip install 'domainfusion_bench[timm]' "
                           "(or pip install timm)") from None
    return timm


def _check_name(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        arch = name.split(".")[0]
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise DfbenchError(f"timm has no model {name!r}. Names like it: {', '.join(close) or 'none'} "
                           "(all: python -c 'import timm; print(timm.list_models())')")


def cached_weights(name: str) -> Path | None:
    """The pretrained weights file of ``name`` already on this machine, or None (never downloads)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else WEIGHT_FILES
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return path
    return None


def _missing_weights(name: str) -> DfbenchError:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    where = (f"the Hugging Face cache ({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}, repo "
             f"{cfg.hf_hub_id}; e.g. `huggingface-cli download {cfg.hf_hub_id}` on a machine with internet, then copy "
             "the cache)") if cfg is not None and cfg.hf_hub_id else f"{Path(torch.hub.get_dir()) / 'checkpoints'}"
    return DfbenchError(
        f"no pretrained weights for timm:{name} on this machine (nothing is downloaded here). Put them in {where}, "
        f"or pass --hparams '{{\"pretrained\": \"/path/to/weights.safetensors\"}}' (a file or a downloaded hub folder), "
        "or train from scratch with --hparams '{\"pretrained\": \"none\"}'.")


def weights_file(name: str, pretrained: str) -> Path | None:
    """Where the weights come from: None (from scratch), the cached default, or the given file/folder."""
    if pretrained == "none":
        return None
    if pretrained == "imagenet":
        found = cached_weights(name)
        if found is None:
            raise _missing_weights(name)
        return found
    path = Path(pretrained)
    if path.is_dir():
        files = [p for f in WEIGHT_FILES for p in sorted(path.rglob(f))]
        if not files:
            raise DfbenchError(f"pretrained folder {path} holds none of {', '.join(WEIGHT_FILES)}; "
                               "pass the weights file itself")
        return files[0]
    if not path.is_file():
        raise DfbenchError(f"pretrained weights {path} do not exist (pretrained is 'imagenet', 'none', a file or a folder)")
    return path


class TimmFeaturizer(nn.Module):
    """A timm model without its classifier (``num_classes=0``: pooled features, ``n_outputs`` of them)."""

    def __init__(self, name: str, pretrained: str = "imagenet", input_shape: tuple[int, ...] = (3, 224, 224),
                 kwargs: dict | None = None):
        super().__init__()
        in_channels = int(input_shape[0])
        timm = _timm()
        _check_name(name)
        source = weights_file(name, pretrained)
        kwargs = dict(kwargs or {})
        try:
            if source is None:
                self.model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
            else:
                self.model = timm.create_model(name, pretrained=True, num_classes=0, in_chans=in_channels,
                                               pretrained_cfg_overlay={"file": str(source)}, **kwargs)
        except (TypeError, RuntimeError, KeyError) as err:  # a bad kwarg, or weights of another shape
            raise DfbenchError(f"timm could not build {name} with pretrained={pretrained!r} and timm_kwargs {kwargs}: "
                               f"{str(err).splitlines()[0]}") from None
        self.name, self.pretrained, self.source = name, pretrained, None if source is None else str(source)
        embed = getattr(self.model, "patch_embed", None)  # a ViT with a fixed input size: say so now, not mid-run
        if getattr(embed, "strict_img_size", False) and tuple(embed.img_size) != tuple(input_shape[-2:]):
            size = input_shape[-1]
            raise DfbenchError(f"timm:{name} takes {tuple(embed.img_size)} px images but the dataset gives "
                               f"{tuple(input_shape[-2:])}: use backbone timm:{name}?img_size={size} (timm resamples "
                               "the position embeddings of pretrained weights) or ?dynamic_img_size=true")
        self.n_outputs = self.model.num_features
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        mean, std = self.data_config["mean"], self.data_config["std"]
        if len(mean) != in_channels:  # one-channel inputs: the mean of the model's per-channel values
            mean, std = [sum(mean) / len(mean)] * in_channels, [sum(std) / len(std)] * in_channels
        self.register_buffer("model_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("model_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1))  # the dataset's: x01 = x * std + mean
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1))
        self.renormalize = True
        self.inserted = nn.ModuleDict()  # "stage" (dots as "__") -> layer applied to that module's output
        self._hooks: dict[str, Any] = {}

    # --- normalisation --------------------------------------------------------------------------------
    def set_input_normalization(self, normalization) -> None:
        """The dataset's (mean, std), or None for inputs in [0, 1]; the model then gets its own."""
        mean, std = normalization if normalization is not None else ((0.0,), (1.0,))
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand_as(self.input_mean))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand_as(self.input_std))
        # the same statistics: skip the round trip (bit-identical inputs to a torchvision-normalised model)
        self.renormalize = not (torch.allclose(self.input_mean, self.model_mean) and
                                torch.allclose(self.input_std, self.model_std))

    def describe(self) -> dict[str, Any]:
        """What a record says about this featurizer: the model, its weights and its data config."""
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        return {"backbone": PREFIX + self.name, "pretrained": self.pretrained, "weights": self.source, "data_config": cfg}

    # --- stages ---------------------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        return [f["module"] for f in self.model.feature_info]

    @property
    def auto_mix_stages(self) -> tuple[str, ...]:
        """MixStyle/EFDM default: the first half of the stages (layer1-2 of a four-stage ResNet)."""
        names = self.stage_names
        return tuple(names[: max(1, len(names) // 2)])

    def check_feature_maps(self, stages: list[str], input_shape: tuple[int, ...]) -> None:
        """One dry forward: every named stage must give [B, C, H, W] maps with feature_info's C channels."""
        channels = {f["module"]: f["num_chs"] for f in self.model.feature_info}
        shapes: dict[str, tuple] = {}
        hooks = [self.model.get_submodule(s).register_forward_hook(
            lambda m, i, out, s=s: shapes.__setitem__(s, tuple(out.shape) if torch.is_tensor(out) else None))
            for s in stages]
        was_training = self.training
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(1, *input_shape, device=self.model_mean.device))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        bad = {s: shapes.get(s) for s in stages if not (shapes.get(s) and len(shapes[s]) == 4
                                                         and shapes[s][1] == channels[s])}
        if bad:
            raise DfbenchError(
                f"MixStyle/EFDM mix per-channel statistics of feature maps [B, C, H, W] between stages; timm:{self.name} "
                f"gives {', '.join(f'{s} -> {v}' for s, v in bad.items())} there (tokens, or channels last: a "
                "transformer). Use a convolutional backbone (e.g. timm:convnext_tiny, timm:resnet50, resnet50).")

    def insert_after(self, stage: str, layer: nn.Module) -> None:
        if stage not in self.stage_names:
            raise DfbenchError(f"no stage {stage!r} to insert after; timm:{self.name} has {', '.join(self.stage_names)}")
        key = stage.replace(".", "__")
        self.inserted[key] = layer
        if stage in self._hooks:
            self._hooks[stage].remove()
        self._hooks[stage] = self.model.get_submodule(stage).register_forward_hook(
            lambda module, inputs, out, layer=layer: layer(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            x = (x * self.input_std + self.input_mean - self.model_mean) / self.model_std
        return self.model(x)
