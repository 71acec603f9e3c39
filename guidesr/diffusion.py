"""Diffusion Branch (paper §3.2): VAE encoder -> UNet at t_f with guidance -> long skip -> VAE decoder.

diffusers' `AutoencoderKL` and `UNet2DConditionModel` are used as they are, their weights untouched;
this file walks their submodules in the same order as their own `forward` so that GuideSR can
(a) keep the VAE encoder's down-block inputs for the zero-conv skips into the decoder
(pix2pix-turbo), and (b) add the guidance features at the input of every UNet down block.
With all zero-convs and injection projections at zero the walk equals the diffusers forward
exactly (tests/test_model.py checks it against `vae.encode`, `unet(...)` and `vae.decode`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn


class VAESkipConnections(nn.Module):
    """Zero-initialised 1x1 convs from the VAE encoder's down-block inputs to the decoder's up-block inputs."""

    def __init__(self, vae_block_channels: list[int]):
        super().__init__()
        encoder_inputs = [vae_block_channels[0]] + list(vae_block_channels[:-1])
        reversed_channels = list(reversed(vae_block_channels))
        decoder_inputs = [reversed_channels[0]] + reversed_channels[:-1]
        self.convs = nn.ModuleList(
            nn.Conv2d(src, dst, 1) for src, dst in zip(reversed(encoder_inputs), decoder_inputs)
        )
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)


def vae_encode(vae: AutoencoderKL, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Posterior mean times the scaling factor, and the input of every encoder down block."""
    encoder = vae.encoder
    h = encoder.conv_in(image)  # [B, c0, H, W]
    skips = []
    for block in encoder.down_blocks:
        skips.append(h)
        h = block(h)
    h = encoder.mid_block(h)
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))  # [B, 2*latent, H/8, W/8]
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    mean = h[:, : vae.config.latent_channels]
    return mean * vae.config.scaling_factor, skips


def vae_decode(vae: AutoencoderKL, latent: torch.Tensor, skips: list[torch.Tensor],
               skip_connections: VAESkipConnections) -> torch.Tensor:
    decoder = vae.decoder
    z = latent / vae.config.scaling_factor
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = decoder.mid_block(decoder.conv_in(z), None)
    for block, skip, conv in zip(decoder.up_blocks, reversed(skips), skip_connections.convs):
        h = block(h + conv(skip), None)
    return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(h)))  # [B, 3, H, W]


def unet_time_embedding(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: int) -> torch.Tensor:
    t = torch.full((sample.shape[0],), timestep, device=sample.device, dtype=torch.long)
    return unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t).to(sample.dtype), None)


def fixed_time_embedding(unet: UNet2DConditionModel, timestep: int) -> torch.Tensor:
    """The time embedding at the one timestep a one-step model runs, [1, D], in the UNet's dtype and on its device."""
    weight = next(unet.parameters())
    probe = torch.zeros(1, unet.config.in_channels, 1, 1, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        return unet_time_embedding(unet, probe, timestep)


def unet_forward(unet: UNet2DConditionModel, latent: torch.Tensor, timestep: int, text: torch.Tensor,
                 guidance: torch.Tensor, injections: nn.ModuleList) -> torch.Tensor:
    """UNet(F_l, t_f, F_p, {F'_r}) for a plain SD-style UNet (no class/addition embeddings)."""
    emb = unet_time_embedding(unet, latent, timestep)
    h = unet.conv_in(latent)
    residuals: list[torch.Tensor] = [h]
    # 1. encoder, guidance added at the input of every down block (which is also its skip)
    for block, inject in zip(unet.down_blocks, injections):
        h = inject(h, guidance)
        residuals[-1] = h
        if getattr(block, "has_cross_attention", False):
            h, block_residuals = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
        else:
            h, block_residuals = block(hidden_states=h, temb=emb)
        residuals.extend(block_residuals)
    # 2. middle
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=text)
    else:
        h = unet.mid_block(h, emb)
    # 3. decoder
    for block in unet.up_blocks:
        block_residuals = tuple(residuals[-len(block.resnets):])
        del residuals[-len(block.resnets):]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=block_residuals, encoder_hidden_states=text)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=block_residuals)
    # 4. output
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)  # F_m [B, latent, H/8, W/8]
