"""The one configuration object a GuideSR model is built from, and its presets.

`GuideSRConfig` is the model's only input: `GuideSR(config)` builds every module from it,
checkpoints store it as JSON, and loading compares it field by field.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import typing
from dataclasses import dataclass, field
from typing import Any

# SD-Turbo (SD 2.1 architecture at 512 px) as published in its diffusers folder.
SD_TURBO_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD_TURBO_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

# A structurally identical miniature: same block types, 8x VAE, cross-attention, 2 UNet scales.
# 16 latent channels (as SD3's VAE) instead of 4: a VAE this small, trained for minutes on a CPU,
# reconstructs far better through the wider latent.
TINY_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 16,
    "out_channels": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# SD's noise schedule (its scheduler's num_train_timesteps): the UNet was trained at timesteps 0..999.
TRAIN_TIMESTEPS = 1000

# Each integer field's inclusive (minimum, maximum or None).
_BOUNDS: dict[str, tuple[int, int | None]] = {
    "scale": (1, None),
    "timestep": (0, TRAIN_TIMESTEPS - 1),
    "prompt_length": (1, None),
    "guidance.channels": (1, None),
    "guidance.num_frb": (1, None),  # the last FRB widens C -> 2C
    "guidance.fca_per_frb": (0, None),
    "guidance.injection_channels": (1, None),
    "lora.unet_rank": (0, None),  # 0: no LoRA on the UNet
    "lora.vae_rank": (0, None),
}

# LoRA targets as in pix2pix-turbo / OSEDiff: attention projections, feed-forward and convolutions.
UNET_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out",
]
VAE_LORA_TARGETS = [
    "conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out", "to_q", "to_k", "to_v", "to_out.0",
]


@dataclass
class GuidanceConfig:
    """Guidance branch (paper §3.1) and its injection into the UNet encoder."""

    channels: int = 32  # C: F0 has C channels, F_d and F_r have 2C
    num_frb: int = 4  # n full-resolution blocks
    fca_per_frb: int = 2  # FCA blocks inside each FRB
    # Width of PixelUnshuffle(F_r) at each UNet scale. At scale s the branch first narrows F_r to
    # injection_channels / s^2 channels (never more than 2C), so the unshuffled tensor stays this wide.
    injection_channels: int = 4096


@dataclass
class LoRASettings:
    unet_rank: int = 8
    vae_rank: int = 4
    unet_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    vae_targets: list[str] = field(default_factory=lambda: list(VAE_LORA_TARGETS))


@dataclass
class GuideSRConfig:
    preset: str = "sd-turbo"
    scale: int = 4
    timestep: int = 999  # t_f, the fixed timestep of the one-step model
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD_TURBO_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD_TURBO_VAE))
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    lora: LoRASettings = field(default_factory=LoRASettings)
    prompt_length: int = 77
    # Use the fused Triton kernels on CUDA (inference only; the PyTorch path runs elsewhere).
    use_triton_kernels: bool = True

    def __post_init__(self) -> None:
        """ValueError names a field out of its range (`_BOUNDS`) or a UNet/VAE setting GuideSR cannot build on."""
        for name, (low, high) in _BOUNDS.items():
            value = operator.attrgetter(name)(self)
            if type(value) is not int or value < low or (high is not None and value > high):
                _invalid(name, f"an integer >= {low}" if high is None else f"an integer from {low} to {high}", value)
        for part in ("unet", "vae"):
            settings = getattr(self, part)
            channels, blocks = settings.get("block_out_channels"), settings.get("down_block_types")
            if not (isinstance(channels, (list, tuple)) and channels
                    and all(type(c) is int and c >= 1 for c in channels)):
                _invalid(f"{part}.block_out_channels", "a non-empty list of integers >= 1", channels)
            if isinstance(blocks, (list, tuple)) and len(blocks) != len(channels):
                _invalid(f"{part}.block_out_channels", f"a list of one entry per {part}.down_block_types entry "
                         f"({len(blocks)})", channels)
        text_dim, latent = self.unet.get("cross_attention_dim"), self.vae.get("latent_channels")
        if type(text_dim) is not int or text_dim < 1:
            _invalid("unet.cross_attention_dim", "an integer >= 1", text_dim)
        for name in ("in_channels", "out_channels"):
            if latent is not None and self.unet.get(name, latent) != latent:
                _invalid(f"unet.{name}", f"equal to vae.latent_channels ({latent!r})", self.unet[name])

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def injection_scales(self) -> list[int]:
        """Pixel-unshuffle factor s for each UNet encoder scale (input of each down block)."""
        return [self.vae_factor * 2**i for i in range(len(self.unet["block_out_channels"]))]

    @property
    def size_multiple(self) -> int:
        return self.injection_scales[-1]

    @property
    def text_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuideSRConfig":
        """The config of `to_dict`'s output (a checkpoint's JSON); ValueError names an unknown field or one whose
        value has the wrong type or is out of range."""
        fields = _typed_fields(cls, data, "")
        fields["guidance"] = GuidanceConfig(**_typed_fields(GuidanceConfig, data.get("guidance", {}), "guidance."))
        fields["lora"] = LoRASettings(**_typed_fields(LoRASettings, data.get("lora", {}), "lora."))
        return cls(**fields)


def _invalid(name: str, requirement: str, value: Any) -> typing.NoReturn:
    raise ValueError(f"GuideSR config field {name} must be {requirement}, got {value!r}")


_FIELD_KINDS = {int: "an integer", bool: "true or false", str: "a string", dict: "an object",
                list: "a list of strings"}


def _typed_fields(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """`data` as keyword arguments of the dataclass `cls`, each value checked against its field's type (an int is
    not a bool, nor a bool an int); nested dataclasses stay dicts for the caller to build."""
    if not isinstance(data, dict):
        raise ValueError(f"GuideSR config field {prefix.rstrip('.') or 'config'} must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown GuideSR config fields: {sorted(prefix + name for name in unknown)}")
    for name, value in data.items():
        kind = typing.get_origin(hints[name]) or hints[name]
        if dataclasses.is_dataclass(kind):
            kind = dict
        valid = type(value) is kind if kind in (int, bool) else isinstance(value, kind)
        if kind is list:
            valid = valid and all(isinstance(item, str) for item in value)
        if not valid:
            raise ValueError(f"GuideSR config field {prefix}{name} must be {_FIELD_KINDS[kind]}, got {value!r}")
    return dict(data)


def tiny_config() -> GuideSRConfig:
    """A few MB; runs 256x256 in well under 2 s on 2 CPU cores. Tests and the embedded demo use it."""
    return GuideSRConfig(
        preset="tiny",
        unet=dict(TINY_UNET),
        vae=dict(TINY_VAE),
        guidance=GuidanceConfig(channels=16, num_frb=2, fca_per_frb=2, injection_channels=512),
    )


def sd_turbo_config() -> GuideSRConfig:
    """The real SD-Turbo shapes; base weights come from a local diffusers-format folder."""
    return GuideSRConfig(preset="sd-turbo")


PRESETS = {"tiny": tiny_config, "sd-turbo": sd_turbo_config}


def preset_config(name: str) -> GuideSRConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
