"""GuideSR: Guidance Branch + Diffusion Branch, one step, built from one `GuideSRConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn

from .config import GuideSRConfig
from .diffusion import VAESkipConnections, unet_forward, vae_decode, vae_encode
from .guidance import GuidanceBranch
from .injection import build_injections
from .prompt import StoredPromptEmbedding


@dataclass(frozen=True)
class ModelDescriptor:
    """What a runtime needs to know to run a loaded model (in the spirit of spandrel)."""

    preset: str
    scale: int
    size_multiple: int  # inputs are padded to this internally; tiles of this multiple avoid padding
    input_range: tuple[float, float]
    supports_half: bool
    # "approximate": FCA's global average pool and the VAE/UNet GroupNorms see per-tile statistics,
    # so a tiled result differs slightly from a whole-image one; overlap + blending hides seams.
    tiling: str
    checkpoint_sha256: str | None


@dataclass
class GuideSROutput:
    r1: torch.Tensor  # Diffusion Branch output, the model's result      [B, 3, H, W] in [-1, 1]
    r2: torch.Tensor  # Guidance Branch residual image (used in training) [B, 3, H, W] in [-1, 1]


class GuideSR(nn.Module):
    def __init__(self, config: GuideSRConfig, unet: UNet2DConditionModel | None = None,
                 vae: AutoencoderKL | None = None, prompt: nn.Module | None = None):
        super().__init__()
        self.config = config
        g = config.guidance
        use_kernel = config.use_triton_kernels
        # Base modules: given (loaded from a diffusers folder) or built from the config (random weights).
        self.unet = unet if unet is not None else UNet2DConditionModel(**config.unet)
        self.vae = vae if vae is not None else AutoencoderKL(**config.vae)
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        # Trainable parts.
        self.guidance = GuidanceBranch(g.channels, g.num_frb, g.fca_per_frb, use_kernel)
        self.injections = build_injections(
            2 * g.channels, list(config.unet["block_out_channels"]), config.injection_scales,
            g.injection_channels, use_kernel,
        )
        self.vae_skips = VAESkipConnections(list(config.vae["block_out_channels"]))
        self.prompt = prompt if prompt is not None else StoredPromptEmbedding(config.prompt_length, config.text_dim)
        self._lora_tuners = self._add_lora()
        self.checkpoint_sha256: str | None = None

    def _add_lora(self) -> dict[str, LoraModel]:
        """LoRA through peft, injected in place; base weights stay frozen, LoRA B starts at zero."""
        lora = self.config.lora
        settings = {
            "unet": (self.unet, lora.unet_rank, lora.unet_targets),
            "vae": (self.vae, lora.vae_rank, lora.vae_targets),
        }
        tuners = {}
        for name, (module, rank, targets) in settings.items():
            if rank <= 0:
                continue
            lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                     init_lora_weights="gaussian")
            tuners[name] = LoraModel(module, lora_config, "default")
        return tuners

    @property
    def lora_merged(self) -> bool:
        return not self._lora_tuners

    def merge_lora(self) -> None:
        """Fold every LoRA update into its base weight (peft `merge_and_unload`); for export."""
        for tuner in self._lora_tuners.values():
            tuner.merge_and_unload()
        self._lora_tuners = {}

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The parts a checkpoint stores: guidance, injections, VAE skips, prompt embedding, LoRA."""
        names = {n for n, _ in self.trainable_parameters()}
        return {n: t for n, t in self.state_dict().items() if n in names}

    @property
    def descriptor(self) -> ModelDescriptor:
        return ModelDescriptor(
            preset=self.config.preset,
            scale=self.config.scale,
            size_multiple=self.config.size_multiple,
            input_range=(-1.0, 1.0),
            supports_half=True,
            tiling="approximate",
            checkpoint_sha256=self.checkpoint_sha256,
        )

    def forward(self, image: torch.Tensor) -> GuideSROutput:
        """image: the LR input already resized to the output size, [B, 3, H, W] in [-1, 1]."""
        height, width = image.shape[-2:]
        # 1. pad to the size multiple (reflect), so every pixel-unshuffle and VAE/UNet scale divides
        x = pad_to_multiple(image, self.config.size_multiple)  # [B, 3, Hp, Wp]
        # 2. Guidance Branch at full resolution
        guidance, r2 = self.guidance(x)  # F_r [B, 2C, Hp, Wp], R2 [B, 3, Hp, Wp]
        # 3. prompt
        text = self.prompt(x)  # F_p [B, L, D]
        # 4. VAE encoder
        latent, skips = vae_encode(self.vae, x)  # F_l [B, latent_channels, Hp/8, Wp/8]
        # 5. UNet at t_f with guidance, long skip F_n = F_m + F_l
        residual = unet_forward(self.unet, latent, self.config.timestep, text, guidance, self.injections)
        latent = latent + residual
        # 6. VAE decoder with zero-conv skips
        r1 = vae_decode(self.vae, latent, skips, self.vae_skips)  # [B, 3, Hp, Wp]
        # 7. crop back and clamp
        r1 = r1[..., :height, :width].clamp(-1, 1)
        r2 = r2[..., :height, :width].clamp(-1, 1)
        return GuideSROutput(r1=r1, r2=r2)

    @torch.no_grad()
    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """LR [B, 3, h, w] in [-1, 1] -> SR [B, 3, h*scale, w*scale] (bicubic resize, then the model)."""
        upsampled = F.interpolate(low_res, scale_factor=self.config.scale, mode="bicubic", align_corners=False)
        return self(upsampled.clamp(-1, 1)).r1


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple; reflect where the image is large enough, else replicate."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def set_kernels_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fused-kernel call site (FCA blocks, injections) between Triton and PyTorch."""
    for module in model.modules():
        if hasattr(module, "use_kernel"):
            module.use_kernel = enabled
