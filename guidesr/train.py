"""Train GuideSR (paper §3.3): one command, one GPU or many through torchrun, resumable exactly.

    python -m guidesr.train --preset sd-turbo --base-model DIR --data DIR --out runs/x
    torchrun --nproc_per_node 8 -m guidesr.train --preset sd-turbo --base-model DIR --data DIR --out runs/x

Exact resumption without saving iterator state: every random draw of micro-batch k on rank r
(which images, their crops and flips, every degradation parameter) comes from generators seeded
with (seed, rank, k) (guidesr.data.TrainingPairs), so a resumed run rebuilds its batches from the
step number alone. The
learning rate is a pure function of the step too (linear warm-up, then cosine). A training-state
checkpoint holds the trained model parts, the discriminator's trained parts, both optimisers, fp16's loss
scale and the step, all as safetensors + JSON (nothing pickled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from runtime.cli import EXIT_INTERRUPTED, bounded_float, bounded_int, non_finite_as_null, plural, write_whole_files

from .checkpoint import CheckpointError, read_checkpoint_record, save_checkpoint
from .config import PRESETS, preset_config
from .data import MAX_RANKS, RANK_MICRO_BATCHES, HRImageFolder, PairConfig, SampleImages, TrainingPairs
from .degradations import DegradationConfig
from .discriminators import DiscriminatorConfig, build_discriminator
from .loading import build_model, has_text_encoder
from .losses import GuideSRLoss, LossConfig, discriminator_loss
from .prompt import StoredPromptEmbedding

if TYPE_CHECKING:
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
    # "all": every trained parameter decays; "matrices": biases, norm gains and the learned prompt embedding do not
    weight_decay_scope: str = "all"
    disc_lr: float = 1e-4
    disc_weight_decay: float = 1e-2
    disc_lr_schedule: str = "constant"  # "constant", or "generator": --disc-lr scaled by the generator's schedule
    max_grad_norm: float | None = None  # clip each model's gradient norm to this per step; None: no clipping
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


def discriminator_learning_rate(config: TrainConfig, step: int) -> float:
    """--disc-lr, constant or, with disc_lr_schedule "generator", following the generator's warm-up and decay."""
    if config.disc_lr_schedule == "constant":
        return config.disc_lr
    return config.disc_lr * learning_rate(config, step) / config.lr


def optimizer_groups(module: nn.Module, scope: str) -> list[dict[str, Any]]:
    """AdamW parameter groups over `module`'s trained parameters. Scope "all": one group, every parameter decays.
    Scope "matrices": a second group with weight decay 0 holds the parameters that decay would pull away from a
    meaningful start or scale: biases and norm gains (under two dimensions) and the learned prompt embedding."""
    trained = [p for p in module.parameters() if p.requires_grad]
    if scope == "all":
        return [{"params": trained}]
    prompt = {id(p) for m in module.modules() if isinstance(m, StoredPromptEmbedding) for p in m.parameters()}
    undecayed = [p for p in trained if p.ndim < 2 or id(p) in prompt]
    return [{"params": [p for p in trained if p.ndim >= 2 and id(p) not in prompt]},
            {"params": undecayed, "weight_decay": 0.0}]


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


def load_images(data: str, crop_size: int):
    """The sample photos are few and kept in memory; a user's folder is read image by image, and every
    file's header is checked first (readable, large enough for the crops)."""
    if data == "sample":
        images = SampleImages("train")
        return [images[i] for i in range(len(images))]
    return HRImageFolder(data, crop_size=crop_size)


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


def save_train_state(path: Path, step: int, elapsed_s: float, model: GuideSR, discriminator: nn.Module | None,
                     optimizer: torch.optim.Optimizer, disc_optimizer: torch.optim.Optimizer | None,
                     scaler: torch.amp.GradScaler, config: TrainConfig) -> None:
    """Writes the training state at `step` into `path`, with `elapsed_s`: the seconds of training up to that step,
    summed over the runs that resumed it (metrics.jsonl's `time`)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trained_state_dict().items()}
    opt_tensors, opt_groups = _flatten_optimizer(optimizer, "optimizer")
    tensors |= opt_tensors
    record: dict[str, Any] = {"format": STATE_FORMAT, "step": step, "elapsed_s": elapsed_s,
                              "config": dataclasses.asdict(config), "optimizer": opt_groups,
                              "scaler": scaler.state_dict()}
    if discriminator is not None and disc_optimizer is not None:
        tensors |= {f"discriminator.{k}": v.detach().cpu().contiguous()
                    for k, v in discriminator.trained_state_dict().items()}
        disc_tensors, disc_groups = _flatten_optimizer(disc_optimizer, "disc_optimizer")
        tensors |= disc_tensors
        record["disc_optimizer"] = disc_groups
    write_whole_files({path / "state.safetensors": save_tensors(tensors, metadata={"step": str(step)}),
                       path / "state.json": json.dumps(record, indent=2, default=str).encode()})


# Settings a resumed run may change: where and how often it writes, and how far it goes.
RESUMABLE_CHANGES = frozenset({"out", "name", "resume", "checkpoint_every", "log_every", "num_workers",
                               "save_every_rank", "steps"})


def config_changes(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings of `config` that differ from a saved run's and would make its continuation another run
    (settings the saved run did not record, from an older guidesr, are not compared)."""
    def flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            elif key in ("base_model", "data") and value not in (None, "sample"):
                items[prefix + key] = str(Path(value).resolve())
            else:
                items[prefix + key] = value
        return items

    before = flat(saved)
    now = flat(json.loads(json.dumps(dataclasses.asdict(config), default=str)))
    return [f"{key} {before[key]!r} -> {now[key]!r}" for key in sorted(now)
            if key in before and key not in RESUMABLE_CHANGES and before[key] != now[key]]


def read_state_record(path: Path) -> dict[str, Any]:
    """state.json of the training state in `path`; ValueError naming the file when it is not one we wrote."""
    try:
        record = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'state.json'} is not valid JSON ({err}); --no-resume starts over") from err
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a GuideSR training state; --no-resume starts over")
    missing = [key for key in ("step", "config", "optimizer") if key not in record]
    if missing or not isinstance(record["config"], dict):
        raise ValueError(f"{path / 'state.json'} is incomplete (lacks {', '.join(missing) or 'a config object'}); "
                         f"--no-resume starts over")
    return record


def load_train_state(path: Path, model: GuideSR, discriminator: nn.Module | None,
                     optimizer: torch.optim.Optimizer, disc_optimizer: torch.optim.Optimizer | None,
                     scaler: torch.amp.GradScaler) -> tuple[int, float]:
    """Loads the state into the model, discriminator, optimisers and loss scaler (an fp16 state from before the
    scale was recorded leaves the scaler at its initial scale); returns its step and elapsed seconds (0 for a state
    from before the elapsed time was recorded)."""
    record = read_state_record(path)
    with safe_open(path / "state.safetensors", "pt") as handle:
        tensor_step = (handle.metadata() or {}).get("step")
    if tensor_step is not None and tensor_step != str(record["step"]):
        raise ValueError(f"training state {path} is torn: state.json is at step {record['step']}, its tensors at step "
                         f"{tensor_step} (a run stopped while saving); --no-resume starts over")
    tensors = load_file(path / "state.safetensors")
    model_tensors = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = set(model.trained_state_dict()) - set(model_tensors)
    if missing:
        raise ValueError(f"training state {path} lacks {plural(len(missing), 'model tensor')}, e.g. "
                         f"{sorted(missing)[:3]}")
    model.load_state_dict(model_tensors, strict=False)
    _unflatten_optimizer(optimizer, tensors, record["optimizer"], "optimizer")
    if discriminator is not None and disc_optimizer is not None:
        disc = {k[len("discriminator."):]: v for k, v in tensors.items() if k.startswith("discriminator.")}
        trained = set(discriminator.trained_state_dict())
        if trained - set(disc):
            raise ValueError(f"training state {path} lacks {plural(len(trained - set(disc)), 'discriminator tensor')}, "
                             f"e.g. {sorted(trained - set(disc))[:3]}")
        discriminator.load_state_dict({k: v for k, v in disc.items() if k in trained}, strict=False)
        _unflatten_optimizer(disc_optimizer, tensors, record["disc_optimizer"], "disc_optimizer")
    if scaler.is_enabled() and record.get("scaler"):
        scaler.load_state_dict(record["scaler"])
    return int(record["step"]), float(record.get("elapsed_s", 0.0))


# ---- the loop ----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, config: TrainConfig, env: Distributed | None = None, device: torch.device | None = None):
        self.config = config
        self.env = env or Distributed()
        self.device = device or torch.device("cpu")
        self.out = Path(config.out)
        if config.base_model is None and not config.random_base:
            raise ValueError("training needs --base-model DIR (a local diffusers folder with unet/ and vae/)")
        if config.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"precision {config.precision} needs CUDA; use fp32 on the CPU")
        if config.steps * config.grad_accum > RANK_MICRO_BATCHES or self.env.world_size > MAX_RANKS:
            raise ValueError(f"{plural(config.steps, 'step')} of "
                             f"{plural(config.grad_accum, 'micro-batch', 'micro-batches')} on "
                             f"{plural(self.env.world_size, 'rank')}: the batch seeds give each of up to {MAX_RANKS} "
                             f"ranks {RANK_MICRO_BATCHES} distinct micro-batches")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")
        state = self.out / "state"
        resuming = config.resume and (state / "state.json").is_file()
        if resuming:
            changes = config_changes(read_state_record(state)["config"], config)
            if changes:
                raise ValueError(f"{state} is a run with other settings (" + "; ".join(changes) + "): rerun with its "
                                 "settings to resume it, or choose another --out, or --no-resume to start over there")
        torch.manual_seed(config.seed)
        self.model = build_model(preset_config(config.preset), None if config.random_base else config.base_model,
                                 seed=config.seed, prompt_init=self.prompt_start(config)).to(self.device)
        self.model.train()
        self.criterion = GuideSRLoss(config.loss).to(self.device)  # fails here, at start, without LPIPS weights
        self.discriminator = (build_discriminator(config.discriminator).to(self.device)
                              if config.loss.w_gan > 0 else None)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, config.weight_decay_scope), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.disc_optimizer = None
        if self.discriminator is not None:  # a CLIP backbone is frozen: its heads only
            self.disc_optimizer = torch.optim.AdamW(optimizer_groups(self.discriminator, config.weight_decay_scope),
                                                    lr=config.disc_lr, betas=(0.5, 0.999),
                                                    weight_decay=config.disc_weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and self.device.type == "cuda")
        self.step = 0
        self.elapsed_s = 0.0  # seconds of training up to self.step, over every run of this folder since step 0
        if resuming:
            self.step, self.elapsed_s = load_train_state(state, self.model, self.discriminator, self.optimizer,
                                                         self.disc_optimizer, self.scaler)
        self.saved_step = self.step  # the step of the last checkpoint, 0 before any
        pairs = PairConfig(batch_size=config.batch_size, crop_size=config.crop_size, degradation=config.degradation,
                           seed=config.seed, num_workers=config.num_workers)
        self.batches = TrainingPairs(load_images(config.data, config.crop_size), pairs, self.device, rank=self.env.rank,
                                     start=self.step * config.grad_accum)
        self.ddp_model = self._wrap(self.model)
        self.ddp_disc = self._wrap(self.discriminator) if self.discriminator is not None else None

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
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _reduces_gradients(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Where a DDP forward runs: its backward all-reduces the gradients on a step's last micro-batch only, the
        others accumulate them locally."""
        return contextlib.nullcontext() if last or self.env.world_size == 1 else module.no_sync()

    def _discriminator_learns(self, learns: bool) -> None:
        """Gradients for the discriminator's trained parameters during its own step only; its frozen parts never
        get one."""
        if self.disc_optimizer is None:
            return
        for group in self.disc_optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad_(learns)

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Clips the global norm of `optimizer`'s gradients (unscaled first under fp16; after DDP's all-reduce and
        every micro-batch, so the whole step's gradient) to max_grad_norm; returns the norm before clipping."""
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    def _loss_means_over_ranks(self, values: torch.Tensor, terms: int) -> torch.Tensor:
        """`values` (this rank's `terms` loss terms, then the gradient norms) with the loss terms replaced by their
        means over the ranks and, appended, one entry per rank: 1 where that rank had a non-finite loss term, else 0.
        One all-reduce. The norms are not reduced: DDP reduced the gradients they measure, so every rank has them
        already, bit for bit."""
        ranks = torch.zeros(self.env.world_size, device=values.device)
        ranks[self.env.rank] = values[:terms].isfinite().logical_not().any()
        reduced = torch.cat([values[:terms] / self.env.world_size, ranks])
        dist.all_reduce(reduced)
        return torch.cat([reduced[:terms], values[terms:], reduced[terms:]])

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the generator, then of the discriminator. The loss terms stay on the device until
        the step's end, where one transfer reads them (a GPU is not stalled per micro-batch); under DDP the loss terms
        are averaged over the ranks first (one all-reduce), so every rank logs the global batch's. A non-finite term
        raises FloatingPointError there, on every rank at once, before the step is logged or saved, except under
        fp16's GradScaler, which skips such a step (its gradients are not finite) and lowers the loss scale."""
        config = self.config
        lr = learning_rate(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.disc_optimizer is not None:
            for group in self.disc_optimizer.param_groups:
                group["lr"] = discriminator_learning_rate(config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[tuple[str, int, torch.Tensor]] = []  # (term, micro-batch, value) in the order computed
        norms: dict[str, torch.Tensor] = {}
        batches = []
        for micro in range(config.grad_accum):
            lq, hr = next(self.batches)
            self._discriminator_learns(False)
            with self._reduces_gradients(self.ddp_model, micro == config.grad_accum - 1), self._autocast():
                out = self.ddp_model(lq)
                loss, terms = self.criterion(out.r1, out.r2, hr, self.discriminator)
            self.scaler.scale(loss / config.grad_accum).backward()
            batches.append((hr, out.r1.detach(), out.r2.detach()))
            losses += [(key, micro, value) for key, value in terms.items()]
        if config.max_grad_norm is not None:
            norms["grad_norm"] = self._clip_gradients(self.optimizer)
        self.scaler.step(self.optimizer)
        if self.discriminator is not None:
            self._discriminator_learns(True)
            self.disc_optimizer.zero_grad(set_to_none=True)
            for micro, (hr, r1, r2) in enumerate(batches):
                with self._reduces_gradients(self.ddp_disc, micro == len(batches) - 1), self._autocast():
                    d_loss = discriminator_loss(self.ddp_disc, hr, r1, r2)
                self.scaler.scale(d_loss / config.grad_accum).backward()
                losses.append(("disc", micro, d_loss.detach()))
            if config.max_grad_norm is not None:
                norms["disc_grad_norm"] = self._clip_gradients(self.disc_optimizer)
            self.scaler.step(self.disc_optimizer)
        self.scaler.update()
        values = torch.stack([value.float() for *_, value in losses] + list(norms.values()))
        if self.env.world_size > 1:
            values = self._loss_means_over_ranks(values, len(losses))
        values = values.tolist()
        logs: dict[str, float] = {}
        for (key, micro, _), value in zip(losses, values):
            if not math.isfinite(value) and not self.scaler.is_enabled():
                where = ""
                if self.env.world_size > 1:
                    ranks = [rank for rank, flag in enumerate(values[len(losses) + len(norms):]) if flag]
                    where = (f", the mean over {self.env.world_size} ranks; not finite on "
                             f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}")
                raise FloatingPointError(
                    f"step {self.step + 1}: loss term {key} is {value} (micro-batch {micro + 1} of "
                    f"{config.grad_accum}{where}); stopped before logging or saving it, the last checkpoint is at step "
                    f"{self.saved_step}")
            logs[key] = logs.get(key, 0.0) + value / config.grad_accum
        for key, value in zip(norms, values[len(losses):]):
            if not math.isfinite(value) and not self.scaler.is_enabled():
                raise FloatingPointError(
                    f"step {self.step + 1}: {key} is {value} with finite loss terms, so the step's update made the "
                    f"weights non-finite; stopped before logging or saving it, the last checkpoint is at step "
                    f"{self.saved_step}")
        logs |= dict(zip(norms, values[len(losses):]))
        self.step += 1
        logs["lr"] = lr
        return logs

    def save(self) -> None:
        """Rank 0 writes the training state and the checkpoint; every rank records the step (its error messages name
        the last checkpoint). Weights that are not finite (an update from a non-finite gradient that no loss term
        showed) are refused with FloatingPointError before anything is written, on every rank alike."""
        self._check_weights_finite()
        if self.config.save_every_rank:
            save_checkpoint(self.model, self.out / f"rank{self.env.rank}" / "guidesr")
        if self.env.is_main:
            save_train_state(self.out / "state", self.step, self.elapsed_s, self.model, self.discriminator,
                             self.optimizer, self.disc_optimizer, self.scaler, self.config)
            base = (None if self.config.random_base
                    else os.path.relpath(Path(self.config.base_model).resolve(), self.out.resolve()))
            save_checkpoint(self.model, self.out / self.config.name, base_model=base,
                            extra={"training": {"step": self.step, "config": dataclasses.asdict(self.config)}})
        self.saved_step = self.step

    def _check_weights_finite(self) -> None:
        """One device read for all of the weights the optimisers train."""
        trained = {id(param) for optimizer in (self.optimizer, self.disc_optimizer) if optimizer is not None
                   for group in optimizer.param_groups for param in group["params"]}
        named = [(name, param) for module in (self.model, self.discriminator) if module is not None
                 for name, param in module.named_parameters() if id(param) in trained]
        finite = torch.stack([param.detach().isfinite().all() for _, param in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise FloatingPointError(
                f"step {self.step}: {plural(len(bad), 'trained weight tensor')} not finite ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}); not saved, the last checkpoint is at step {self.saved_step}")

    def checkpoint_step(self) -> int | None:
        """The step OUT/NAME.json was written at, None when there is none."""
        try:
            record, _ = read_checkpoint_record(self.out / self.config.name)
        except CheckpointError:
            return None
        return record.get("training", {}).get("step")

    def _say(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message, file=sys.stderr)

    def fit(self, until: int | None = None) -> list[dict[str, float]]:
        """Run to `until` (default: config.steps); returns the per-step logs of this call."""
        until = self.config.steps if until is None else until
        history = []
        log_path = self.out / "metrics.jsonl"
        if self.step > 0:
            self._say(f"resuming {self.out} at step {self.step} of {self.config.steps}")
            if self.env.is_main:
                _drop_log_lines_after(log_path, self.step)  # logged after the checkpoint it resumes from
        if self.config.warmup_steps >= until > self.step:
            self._say(f"note: the learning rate warms up over {plural(self.config.warmup_steps, 'step')}, so it stays "
                      f"under --lr {self.config.lr:g} up to step {until}")
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        log_mode = "a" if self.step > 0 else "w"  # a fresh run (e.g. --no-resume) replaces the log at its first line
        bar = tqdm(total=until, initial=self.step, disable=not self.env.is_main, desc="train", dynamic_ncols=True)
        start = time.time() - self.elapsed_s
        while self.step < until:
            logs = self.train_step()
            self.elapsed_s = time.time() - start
            history.append(logs)
            bar.update(1)
            if self.env.is_main and (self.step % self.config.log_every == 0 or self.step == until):
                bar.set_postfix(loss=f"{logs['total']:.4f}", lr=f"{logs['lr']:.2e}")
                with log_path.open(log_mode) as f:
                    f.write(log_line({"step": self.step, "time": round(self.elapsed_s, 2), **logs}))
                log_mode = "a"
            if self.step % self.config.checkpoint_every == 0 or self.step == until:
                self.save()
        bar.close()
        if self.env.is_main and self.step > 0 and self.checkpoint_step() != self.step:
            self.save()  # a run that had already finished, whose checkpoint is missing or older than its state
        self._say(f"checkpoint {self.out / self.config.name}.json at step {self.step}")
        return history


def log_line(entry: dict[str, float]) -> str:
    """One line of metrics.jsonl: strict JSON, with null for a value that is not finite (under fp16, a loss or
    gradient norm of a step that GradScaler skipped)."""
    return json.dumps(non_finite_as_null(entry), allow_nan=False) + "\n"


def _drop_log_lines_after(log_path: Path, step: int) -> None:
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        log_path.write_text("".join(kept))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help, unless it has none (None, a flag's False) or the help gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # `is`, not `in`: 0 == False, and a default of 0 (--seed, --num-workers, --min-lr-ratio) is worth showing
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return text + (" (default: '')" if action.default == "" else " (default: %(default)s)")


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m guidesr.train", description=__doc__, formatter_class=_HelpFormatter)
    positive, count = bounded_int(1), bounded_int(0)
    rate = bounded_float(0, exclusive_minimum=True)
    weight, probability = bounded_float(0), bounded_float(0, 1)
    p.add_argument("--preset", default=defaults.preset, choices=sorted(PRESETS), help="model size")
    p.add_argument("--base-model", default=None,
                   help="local diffusers folder with unet/ and vae/ (the preset's shapes)")
    p.add_argument("--random-base", action="store_true", help="random base weights (smoke tests only)")
    p.add_argument("--data", default=defaults.data, help="'sample' or a folder of HR images (recursive)")
    p.add_argument("--out", default=defaults.out,
                   help="run folder: the checkpoint NAME.json/.safetensors, state/ (for resuming) and metrics.jsonl")
    p.add_argument("--name", default=defaults.name, help="checkpoint name inside --out (no folders)")
    p.add_argument("--steps", type=positive, default=defaults.steps,
                   help="optimiser steps of the whole run (the learning-rate schedule's length)")
    p.add_argument("--batch-size", type=positive, default=defaults.batch_size, help="images per rank and micro-step")
    p.add_argument("--grad-accum", type=positive, default=defaults.grad_accum, help="micro-steps per optimiser step")
    p.add_argument("--crop-size", type=positive, default=defaults.crop_size,
                   help="HR crop side in pixels (a multiple of the scale, 4)")
    p.add_argument("--warmup-steps", type=count, default=defaults.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--seed", type=count, default=defaults.seed, help="seeds every draw: data, crops, degradations")
    p.add_argument("--checkpoint-every", type=positive, default=defaults.checkpoint_every,
                   help="steps between checkpoints (and at the end)")
    p.add_argument("--log-every", type=positive, default=defaults.log_every,
                   help="steps between lines of metrics.jsonl")
    p.add_argument("--num-workers", type=count, default=defaults.num_workers, help="DataLoader workers reading images")
    p.add_argument("--lr", type=rate, default=defaults.lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=weight, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--weight-decay-scope", default=defaults.weight_decay_scope, choices=["all", "matrices"],
                   help="which trained parameters decay, in both models: all, or matrices (LoRA, conv and linear "
                        "kernels), not biases, norm gains and the learned prompt embedding")
    p.add_argument("--disc-lr", type=rate, default=defaults.disc_lr, help="the discriminator's learning rate")
    p.add_argument("--disc-weight-decay", type=weight, default=defaults.disc_weight_decay,
                   help="the discriminator's AdamW weight decay")
    p.add_argument("--disc-lr-schedule", default=defaults.disc_lr_schedule, choices=["constant", "generator"],
                   help="constant: --disc-lr throughout; generator: --disc-lr with the generator's warm-up and decay")
    p.add_argument("--max-grad-norm", type=rate, default=None,
                   help="clip the generator's and, apart, the discriminator's gradient norm to this each step, and "
                        "log both norms before clipping (default: no clipping)")
    p.add_argument("--min-lr-ratio", type=probability, default=defaults.min_lr_ratio,
                   help="the cosine decay's end, as a fraction of --lr")
    p.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (bf16 and fp16 need CUDA)")
    p.add_argument("--stop-at", type=positive, default=None,
                   help="stop (with a checkpoint) at this step, at most --steps; the schedule still follows --steps")
    p.add_argument("--no-resume", action="store_true",
                   help="start at step 0 even if --out holds a training state: its checkpoint, state and log are "
                        "replaced once the first step has run")
    p.add_argument("--save-every-rank", action="store_true", help="also write each rank's weights to OUT/rankN")
    p.add_argument("--w-mse", type=weight, default=defaults.loss.w_mse, help="weight of the MSE term (eq. 6)")
    p.add_argument("--w-lpips", type=weight, default=defaults.loss.w_lpips,
                   help="weight of the LPIPS term (needs --lpips-vgg; 0 trains without LPIPS)")
    p.add_argument("--w-gan", type=weight, default=defaults.loss.w_gan,
                   help="weight of the adversarial term (0 trains without a discriminator)")
    p.add_argument("--lpips-vgg", default=None, help="torchvision VGG16 weights file for LPIPS (vgg16-397923af.pth)")
    p.add_argument("--lpips-linear", default=None,
                   help="LPIPS v0.1 linear-layer weights (default: the lpips package's)")
    p.add_argument("--second-order-prob", type=probability, default=defaults.degradation.second_order_prob,
                   help="probability of the degradation's second stage, per batch (1.0: Real-ESRGAN x4plus; "
                        "ResShift's configs, which the paper follows, use 0.5)")
    p.add_argument("--discriminator", default=defaults.discriminator.kind, choices=["patch", "clip"],
                   help="clip: the paper's (a frozen CLIP ViT with trained heads; needs --clip-path); patch: a "
                        "PatchGAN that needs no pretrained weights")
    p.add_argument("--clip-path", default=None, help="local CLIP vision model folder for --discriminator clip")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-init", default=defaults.prompt_init, metavar="TEXT",
                        help="start the learned prompt embedding from the base folder's CLIP text encoding of TEXT "
                             "('': the empty prompt; random when the base has no text_encoder/)")
    prompt.add_argument("--prompt-init-random", action="store_true",
                        help="start the learned prompt embedding from N(0, 0.02) noise")
    a = p.parse_args(argv)
    if Path(a.name).name != a.name or a.name in ("", ".", ".."):
        p.error(f"--name {a.name!r}: a file name inside --out, without folders")
    if a.stop_at is not None and a.stop_at > a.steps:
        p.error(f"--stop-at {a.stop_at} is past --steps {a.steps}, where the learning-rate schedule ends; raise "
                f"--steps to train longer")
    if a.w_lpips > 0 and a.lpips_vgg is None:
        p.error("--w-lpips > 0 needs --lpips-vgg FILE (torchvision's vgg16-397923af.pth); --w-lpips 0 trains "
                "without LPIPS")
    if a.w_gan > 0 and a.discriminator == "clip" and a.clip_path is None:
        p.error("--discriminator clip needs --clip-path DIR (a local CLIP vision model); --discriminator patch needs "
                "no weights")
    config = TrainConfig(
        preset=a.preset, base_model=a.base_model, random_base=a.random_base,
        prompt_init=None if a.prompt_init_random else a.prompt_init, data=a.data, out=a.out, name=a.name,
        steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, crop_size=a.crop_size, lr=a.lr,
        warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay,
        weight_decay_scope=a.weight_decay_scope, disc_lr=a.disc_lr, disc_weight_decay=a.disc_weight_decay,
        disc_lr_schedule=a.disc_lr_schedule, max_grad_norm=a.max_grad_norm,
        precision=a.precision, seed=a.seed, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
        num_workers=a.num_workers,
        resume=not a.no_resume, save_every_rank=a.save_every_rank,
        loss=LossConfig(w_mse=a.w_mse, w_lpips=a.w_lpips, w_gan=a.w_gan, lpips_vgg_path=a.lpips_vgg,
                        lpips_linear_path=a.lpips_linear),
        discriminator=DiscriminatorConfig(kind=a.discriminator, clip_path=a.clip_path),
        degradation=replace(defaults.degradation, second_order_prob=a.second_order_prob),
    )
    return config, a.stop_at


def main(argv: list[str] | None = None) -> int:
    config, stop_at = parse_args(argv)
    env, device = init_distributed()
    trainer = None
    try:
        try:
            trainer = Trainer(config, env, device)
        except (ValueError, OSError) as err:  # the setup's checks: folders, files, shapes, settings
            print(f"error: {err}", file=sys.stderr)
            return 2
        trainer.fit(until=stop_at)
    except KeyboardInterrupt:
        if env.is_main:
            saved = trainer.saved_step if trainer is not None else None
            where = f"the last checkpoint is at step {saved}" if saved else "no checkpoint was written"
            print(f"\ninterrupted at step {trainer.step if trainer is not None else 0}; {where}; the same command "
                  f"resumes from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
