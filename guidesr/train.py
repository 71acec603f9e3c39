"""Train GuideSR (paper §3.3): one command, one GPU or many through torchrun, resumable exactly.

    python -m guidesr.train --preset sd-turbo --base-model DIR --data DIR --out runs/x
    torchrun --nproc_per_node 8 -m guidesr.train --preset sd-turbo --base-model DIR --data DIR --out runs/x

Exact resumption without saving iterator state: every random draw of micro-batch k on rank r
(which images, their crops and flips, every degradation parameter) comes from generators seeded
with (seed, rank, k) (guidesr.data.TrainingPairs), so a resumed run rebuilds its batches from the
step number alone. The
learning rate is a pure function of the step too (linear warm-up, then cosine). A training-state
checkpoint holds the trained model parts, the discriminator, both optimisers and the step, all as
safetensors + JSON (nothing pickled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import preset_config
from .data import HRImageFolder, PairConfig, SampleImages, TrainingPairs
from .degradations import DegradationConfig
from .discriminators import DiscriminatorConfig, build_discriminator
from .loading import build_model, has_text_encoder
from .losses import GuideSRLoss, LossConfig, discriminator_loss
from .model import GuideSR

STATE_FORMAT = "guidesr-train-state"


@dataclass
class TrainConfig:
    preset: str = "sd-turbo"
    base_model: str | None = None  # diffusers folder (unet/, vae/); required unless random_base
    random_base: bool = False  # random base weights: for tests and smoke runs only
    # The learned prompt embedding starts from the base text encoder's encoding of this text (the
    # default, the empty prompt, is SD-Turbo's unconditional embedding); None, or "" with a base
    # folder that has no text_encoder/ and tokenizer/: from N(0, 0.02) noise.
    prompt_init: str | None = ""
    data: str = "sample"  # "sample" (scikit-image photos, training split) or a folder of HR images
    out: str = "runs/guidesr"
    name: str = "guidesr"  # the checkpoint is OUT/NAME.json + OUT/NAME.safetensors
    steps: int = 100_000
    batch_size: int = 8  # per rank, per micro-step
    grad_accum: int = 1
    crop_size: int = 256
    lr: float = 5e-5
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    weight_decay: float = 1e-2
    disc_lr: float = 1e-4
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; CUDA only for the half precisions)
    seed: int = 0
    checkpoint_every: int = 1000
    num_workers: int = 0  # DataLoader workers reading and cropping HR images
    save_every_rank: bool = False  # also write each rank's weights to OUT/rankN (checks DDP replicas agree)
    log_every: int = 10
    resume: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(kind="patch"))
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Distributed, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on the CPU."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Distributed(), device
    env = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return env, device


def load_images(data: str):
    """The sample photos are few and kept in memory; a user's folder is read image by image."""
    if data == "sample":
        images = SampleImages("train")
        return [images[i] for i in range(len(images))]
    return HRImageFolder(data)


# ---- training state: safetensors for tensors, JSON for the rest --------------------------------

def _flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{prefix}.state.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _unflatten_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict,
                         prefix: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + ".state."):
            index, key = name[len(prefix) + 7:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_train_state(path: Path, step: int, model: GuideSR, discriminator: nn.Module | None,
                     optimizer: torch.optim.Optimizer, disc_optimizer: torch.optim.Optimizer | None,
                     config: TrainConfig) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trained_state_dict().items()}
    opt_tensors, opt_groups = _flatten_optimizer(optimizer, "optimizer")
    tensors |= opt_tensors
    record: dict[str, Any] = {"format": STATE_FORMAT, "step": step, "config": dataclasses.asdict(config),
                              "optimizer": opt_groups}
    if discriminator is not None and disc_optimizer is not None:
        tensors |= {f"discriminator.{k}": v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()}
        disc_tensors, disc_groups = _flatten_optimizer(disc_optimizer, "disc_optimizer")
        tensors |= disc_tensors
        record["disc_optimizer"] = disc_groups
    save_file(tensors, path / "state.safetensors.tmp")
    os.replace(path / "state.safetensors.tmp", path / "state.safetensors")
    (path / "state.json.tmp").write_text(json.dumps(record, indent=2, default=str))
    os.replace(path / "state.json.tmp", path / "state.json")


def load_train_state(path: Path, model: GuideSR, discriminator: nn.Module | None,
                     optimizer: torch.optim.Optimizer, disc_optimizer: torch.optim.Optimizer | None) -> int:
    record = json.loads((path / "state.json").read_text())
    if record.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a GuideSR training state")
    tensors = load_file(path / "state.safetensors")
    model_tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(model.trained_state_dict()) - set(model_tensors)
    if missing:
        raise ValueError(f"training state {path} lacks {len(missing)} model tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(model_tensors, strict=False)
    _unflatten_optimizer(optimizer, tensors, record["optimizer"], "optimizer")
    if discriminator is not None and disc_optimizer is not None:
        disc = {k[len("discriminator."):]: v for k, v in tensors.items() if k.startswith("discriminator.")}
        discriminator.load_state_dict(disc)
        _unflatten_optimizer(disc_optimizer, tensors, record["disc_optimizer"], "disc_optimizer")
    return int(record["step"])


# ---- the loop ----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, config: TrainConfig, env: Distributed | None = None, device: torch.device | None = None):
        self.config = config
        self.env = env or Distributed()
        self.device = device or torch.device("cpu")
        self.out = Path(config.out)
        if config.base_model is None and not config.random_base:
            raise ValueError("training needs --base-model DIR (a local diffusers folder with unet/ and vae/)")
        torch.manual_seed(config.seed)
        self.model = build_model(preset_config(config.preset), None if config.random_base else config.base_model,
                                 seed=config.seed, prompt_init=self.prompt_start(config)).to(self.device)
        self.model.train()
        self.criterion = GuideSRLoss(config.loss).to(self.device)  # fails here, at start, without LPIPS weights
        self.discriminator = build_discriminator(config.discriminator).to(self.device) if config.loss.w_gan > 0 else None
        params = [p for _, p in self.model.trainable_parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.disc_optimizer = None
        if self.discriminator is not None:
            disc_params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.disc_optimizer = torch.optim.AdamW(disc_params, lr=config.disc_lr, betas=(0.5, 0.999))
        self.step = 0
        if config.resume and (self.out / "state" / "state.json").is_file():
            self.step = load_train_state(self.out / "state", self.model, self.discriminator,
                                         self.optimizer, self.disc_optimizer)
        pairs = PairConfig(batch_size=config.batch_size, crop_size=config.crop_size, degradation=config.degradation,
                           seed=config.seed, num_workers=config.num_workers)
        self.batches = TrainingPairs(load_images(config.data), pairs, self.device, rank=self.env.rank,
                                     start=self.step * config.grad_accum)
        self.ddp_model = self._wrap(self.model)
        self.ddp_disc = self._wrap(self.discriminator) if self.discriminator is not None else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and self.device.type == "cuda")

    @staticmethod
    def prompt_start(config: TrainConfig) -> str | None:
        """The text whose encoding starts the learned prompt, or None for a random start."""
        if config.prompt_init == "" and (config.random_base or not has_text_encoder(config.base_model)):
            return None
        return config.prompt_init

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.env.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        if self.device.type != "cuda":
            raise ValueError(f"precision {self.config.precision} needs CUDA; use fp32 on the CPU")
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def train_step(self) -> dict[str, float]:
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        batches = []
        for micro in range(config.grad_accum):
            lq, hr = next(self.batches)
            last = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.env.world_size == 1 else self.ddp_model.no_sync()
            if self.discriminator is not None:
                self.discriminator.requires_grad_(False)
            with sync, self._autocast():
                out = self.ddp_model(lq)
                loss, terms = self.criterion(out.r1, out.r2, hr, self.discriminator)
            self.scaler.scale(loss / config.grad_accum).backward()
            batches.append((hr, out.r1.detach(), out.r2.detach()))
            for key, value in terms.items():
                logs[key] = logs.get(key, 0.0) + value.item() / config.grad_accum
        self.scaler.step(self.optimizer)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(True)
            self.disc_optimizer.zero_grad(set_to_none=True)
            for hr, r1, r2 in batches:
                with self._autocast():
                    d_loss = discriminator_loss(self.ddp_disc, hr, r1, r2)
                self.scaler.scale(d_loss / config.grad_accum).backward()
                logs["disc"] = logs.get("disc", 0.0) + d_loss.item() / config.grad_accum
            self.scaler.step(self.disc_optimizer)
        self.scaler.update()
        self.step += 1
        logs["lr"] = lr
        return logs

    def save(self) -> None:
        if self.config.save_every_rank:
            save_checkpoint(self.model, self.out / f"rank{self.env.rank}" / "guidesr")
        if not self.env.is_main:
            return
        save_train_state(self.out / "state", self.step, self.model, self.discriminator, self.optimizer,
                         self.disc_optimizer, self.config)
        base = None if self.config.random_base else os.path.relpath(Path(self.config.base_model).resolve(), self.out.resolve())
        save_checkpoint(self.model, self.out / self.config.name, base_model=base,
                        extra={"training": {"step": self.step, "config": dataclasses.asdict(self.config)}})

    def fit(self, until: int | None = None) -> list[dict[str, float]]:
        """Run to `until` (default: config.steps); returns the per-step logs of this call."""
        until = self.config.steps if until is None else until
        history = []
        log_path = self.out / "metrics.jsonl"
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                log_path.unlink(missing_ok=True)  # a fresh run (e.g. --no-resume) starts its own log
        bar = tqdm(total=until, initial=self.step, disable=not self.env.is_main, desc="train", dynamic_ncols=True)
        start = time.time()
        while self.step < until:
            logs = self.train_step()
            history.append(logs)
            bar.update(1)
            if self.env.is_main and (self.step % self.config.log_every == 0 or self.step == until):
                bar.set_postfix(loss=f"{logs['total']:.4f}", lr=f"{logs['lr']:.2e}")
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": self.step, "time": round(time.time() - start, 2), **logs}) + "\n")
            if self.step % self.config.checkpoint_every == 0 or self.step == until:
                self.save()
        bar.close()
        return history


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=defaults.preset, choices=["tiny", "sd-turbo"])
    p.add_argument("--base-model", default=None, help="local diffusers folder with unet/ and vae/")
    p.add_argument("--random-base", action="store_true", help="random base weights (smoke tests only)")
    p.add_argument("--data", default=defaults.data, help="'sample' or a folder of HR images (recursive)")
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--name", default=defaults.name, help="checkpoint name inside --out")
    for name in ("steps", "batch_size", "grad_accum", "crop_size", "warmup_steps", "seed", "checkpoint_every",
                 "log_every", "num_workers"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "disc_lr", "min_lr_ratio"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) at this step; the schedule still follows --steps")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--save-every-rank", action="store_true", help="also write each rank's weights to OUT/rankN")
    p.add_argument("--w-mse", type=float, default=defaults.loss.w_mse)
    p.add_argument("--w-lpips", type=float, default=defaults.loss.w_lpips)
    p.add_argument("--w-gan", type=float, default=defaults.loss.w_gan)
    p.add_argument("--lpips-vgg", default=None, help="torchvision VGG16 weights file for LPIPS")
    p.add_argument("--lpips-linear", default=None, help="LPIPS v0.1 linear-layer weights (default: the lpips package's)")
    p.add_argument("--second-order-prob", type=float, default=defaults.degradation.second_order_prob,
                   help="probability of the degradation's second stage, per batch (default 1.0, Real-ESRGAN "
                        "x4plus; ResShift's configs, which the paper follows, use 0.5)")
    p.add_argument("--discriminator", default=defaults.discriminator.kind, choices=["patch", "clip"],
                   help="clip: the paper's (a frozen CLIP ViT with trained heads; needs --clip-path); patch: a "
                        "PatchGAN that needs no pretrained weights (default patch)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-init", default=defaults.prompt_init, metavar="TEXT",
                        help="start the learned prompt embedding from the base folder's CLIP text encoding of TEXT "
                             "(default '': the empty prompt, or random when the base has no text_encoder/)")
    prompt.add_argument("--prompt-init-random", action="store_true",
                        help="start the learned prompt embedding from N(0, 0.02) noise")
    p.add_argument("--clip-path", default=None, help="local CLIP vision model folder for --discriminator clip")
    a = p.parse_args(argv)
    config = TrainConfig(
        preset=a.preset, base_model=a.base_model, random_base=a.random_base,
        prompt_init=None if a.prompt_init_random else a.prompt_init, data=a.data, out=a.out, name=a.name,
        steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, crop_size=a.crop_size, lr=a.lr,
        warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, disc_lr=a.disc_lr,
        precision=a.precision, seed=a.seed, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
        num_workers=a.num_workers,
        resume=not a.no_resume, save_every_rank=a.save_every_rank,
        loss=LossConfig(w_mse=a.w_mse, w_lpips=a.w_lpips, w_gan=a.w_gan, lpips_vgg_path=a.lpips_vgg,
                        lpips_linear_path=a.lpips_linear),
        discriminator=DiscriminatorConfig(kind=a.discriminator, clip_path=a.clip_path),
        degradation=replace(defaults.degradation, second_order_prob=a.second_order_prob),
    )
    return config, a.stop_at


def main(argv: list[str] | None = None) -> None:
    config, stop_at = parse_args(argv)
    env, device = init_distributed()
    try:
        Trainer(config, env, device).fit(until=stop_at)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
