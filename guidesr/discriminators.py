"""The adversarial critic of GuideSR's training (paper §3.3 and §4 "Training Details").

The paper scores both branch outputs, R1 (Diffusion Branch) and R2 (Guidance Branch),
with discriminators that share weights; here that is one module the trainer calls on each.
Every discriminator maps images in [-1, 1], (B, 3, H, W), to real/fake logits (B, N): one
logit per patch or token, each a separate vote, averaged by the losses.

Two kinds:

* `PatchDiscriminator`: a small PatchGAN-style convolutional net with spectral
  normalisation. Needs no pretrained weights; for tests and for training from nothing.
* `CLIPDiscriminator`: the paper's choice. A frozen CLIP vision transformer, loaded from a
  local folder with `CLIPVisionModel.from_pretrained`, and small trainable heads on the
  tokens of several of its layers (as projected-GAN / vision-aided discriminators do: the
  frozen features make a strong, stable critic; the heads are all that learns). The
  backbone's weights never change, but gradients flow through it to the generated images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

# Normalisation every OpenAI and OpenCLIP CLIP checkpoint was trained with.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """`kind` is "clip" (the paper's) or "patch".

    clip: `clip_path` is a local folder holding a `CLIPVisionModel` (or a full `CLIPModel`,
    whose vision tower is used) as written by `save_pretrained`, e.g. a snapshot of
    openai/clip-vit-large-patch14; `clip_layers` picks the hidden states the heads read
    (0 = embeddings, L = last layer; default: four evenly spaced layers ending at L);
    `head_channels` is the heads' width.
    patch: `patch_channels` is the first layer's width, `patch_layers` the number of
    stride-2 layers (each halves the resolution and doubles the width, up to 8x).
    """

    kind: str = "clip"
    clip_path: str | None = None
    clip_layers: tuple[int, ...] | None = None
    head_channels: int = 256
    patch_channels: int = 64
    patch_layers: int = 3


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) with spectral norm in place of batch norm: each output
    logit judges one receptive-field patch (70x70 px with the default three stride-2
    layers). Spectral norm bounds the critic's Lipschitz constant, which keeps the GAN
    term from overwhelming MSE/LPIPS early in training."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            wider = channels * min(2**i, 8)
            blocks += [spectral_norm(nn.Conv2d(width, wider, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            width = wider
        wider = channels * min(2**layers, 8)
        blocks += [spectral_norm(nn.Conv2d(width, wider, 4, stride=1, padding=1)), nn.LeakyReLU(0.2)]
        blocks.append(spectral_norm(nn.Conv2d(wider, 1, 4, stride=1, padding=1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(1)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training state stores: the whole state (nothing here is pretrained)."""
        return self.state_dict()


class _TokenHead(nn.Module):
    """Per-token MLP (1x1 convolutions over the token axis) from width `dim` to one logit."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(
            spectral_norm(nn.Conv1d(dim, channels, 1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv1d(channels, 1, 1)),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(tokens).transpose(1, 2)).flatten(1)


class CLIPDiscriminator(nn.Module):
    """Frozen CLIP vision backbone + trainable per-layer token heads.

    Images are mapped from [-1, 1] to CLIP's input: [0, 1], resized (bilinear,
    antialiased) to the backbone's `image_size`, normalised with `CLIP_MEAN`/`CLIP_STD`.
    The logits of all heads over all tokens (class token included) are concatenated.
    """

    def __init__(self, clip_path: str | Path, layers: tuple[int, ...] | None = None, head_channels: int = 256) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        if not Path(clip_path).is_dir():
            raise FileNotFoundError(
                f"CLIP folder {clip_path} does not exist: DiscriminatorConfig.clip_path must name a local folder "
                "written by CLIPVisionModel/CLIPModel.save_pretrained (nothing is downloaded)"
            )
        self.backbone = CLIPVisionModel.from_pretrained(str(clip_path), local_files_only=True, use_safetensors=True)
        self.backbone.requires_grad_(False)
        config = self.backbone.config
        depth = config.num_hidden_layers
        self.layers = (layers if layers is not None
                       else tuple(sorted({max(1, round(depth * k / 4)) for k in range(1, 5)})))
        if any(not 0 <= i <= depth for i in self.layers):
            raise ValueError(f"clip_layers {self.layers} outside 0..{depth} for this {depth}-layer backbone")
        self.image_size = config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(_TokenHead(config.hidden_size, head_channels) for _ in self.layers)
        self.backbone.eval()

    def train(self, mode: bool = True) -> CLIPDiscriminator:
        """The heads train; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training state stores: the heads; the frozen backbone is `clip_path`'s."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1.0) / 2.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - self.mean) / self.std
        hidden = self.backbone(pixel_values=x.to(self.backbone.dtype), output_hidden_states=True).hidden_states
        return torch.cat([head(hidden[i].to(x.dtype)) for head, i in zip(self.heads, self.layers)], dim=1)


def build_discriminator(config: DiscriminatorConfig = DiscriminatorConfig()) -> nn.Module:
    if config.kind == "patch":
        return PatchDiscriminator(config.patch_channels, config.patch_layers)
    if config.kind == "clip":
        if config.clip_path is None:
            raise ValueError(
                "DiscriminatorConfig(kind='clip') needs clip_path: a local folder with a CLIP vision model saved by "
                "save_pretrained (e.g. a snapshot of openai/clip-vit-large-patch14); nothing is downloaded. "
                "Use kind='patch' for a discriminator that needs no pretrained weights."
            )
        return CLIPDiscriminator(config.clip_path, config.clip_layers, config.head_channels)
    raise ValueError(f"unknown discriminator kind {config.kind!r}; expected 'clip' or 'patch'")
