"""Make the base model of the `tiny` preset: the stand-in for SD-Turbo that the embedded demo builds on.

SD-Turbo's weights cannot be downloaded here, so the tiny preset gets a base of its own, written as a
diffusers-format folder exactly like a user's SD-Turbo folder (unet/, vae/):

  * VAE: trained as an autoencoder (L1 + MSE on the decoded posterior mean, a small KL term) on
    random crops of the scikit-image training photos, so its latent space carries the image, as
    SD's VAE does.
  * UNet: random weights with `conv_out` set to zero, so the untrained one-step residual F_m is zero
    and F_n = F_l; GuideSR's LoRA (which targets conv_out) learns the residual from there.

    python -m guidesr.pretrain_base --out guidesr/weights/tiny-base --steps 4000 --lr 1e-3 --seed 0
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from runtime.cli import bounded_float, bounded_int, check_out_argument

from .config import tiny_config
from .data import SampleImages, check_crop_sizes, random_crop_flip

VAE_MULTIPLE = 8  # the tiny VAE downsamples 3 times


def train_vae(vae: AutoencoderKL, images: list[torch.Tensor], steps: int, crop: int, batch: int,
              lr: float, generator: torch.Generator, log_every: int = 100) -> list[float]:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    start = time.time()
    for step in range(steps):
        picks = torch.randint(len(images), (batch,), generator=generator).tolist()
        x = torch.stack([random_crop_flip(images[i], crop, generator) for i in picks]) * 2 - 1  # [B, 3, crop, crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    return losses


def make_tiny_base(out: Path, steps: int, seed: int, *, crop: int, batch: int, lr: float) -> None:
    config = tiny_config()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(**config.vae)
    unet = UNet2DConditionModel(**config.unet)
    torch.nn.init.zeros_(unet.conv_out.weight)
    torch.nn.init.zeros_(unet.conv_out.bias)
    images = list(SampleImages("train"))
    train_vae(vae, images, steps, crop, batch, lr, generator)
    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("vae", vae), ("unet", unet)):
        model.save_pretrained(out / name)
        for weights in (out / name).glob("*.safetensors"):  # safetensors writes 0600; config.json has the umask's mode
            shutil.copymode(out / name / "config.json", weights)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guidesr.pretrain_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder to write unet/ and vae/ into (required; files already there are replaced: "
                             "guidesr/weights/tiny-base is the embedded demo model's base)")
    parser.add_argument("--steps", type=bounded_int(1), default=4000, help="VAE training steps (default 4000)")
    parser.add_argument("--lr", type=bounded_float(0, exclusive_minimum=True), default=1e-3,
                        help="peak learning rate of the one-cycle schedule (default 1e-3)")
    parser.add_argument("--crop", type=int, default=64,
                        help=f"training crop size (px), a multiple of {VAE_MULTIPLE} (default 64)")
    parser.add_argument("--batch", type=bounded_int(1), default=8, help="crops per step (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the crops (default 0)")
    args = parser.parse_args(argv)
    if args.crop < VAE_MULTIPLE or args.crop % VAE_MULTIPLE:
        parser.error(f"--crop must be a positive multiple of {VAE_MULTIPLE} (the VAE's downsampling), got {args.crop}")
    try:
        check_crop_sizes(SampleImages("train").paths, args.crop)
    except ValueError as error:
        parser.error(f"--crop {args.crop}: {error}")
    check_out_argument(parser, args.out)
    make_tiny_base(args.out, args.steps, args.seed, crop=args.crop, batch=args.batch, lr=args.lr)


if __name__ == "__main__":
    main()
