"""Issue 3: the trainer (tiny preset, random base, CPU): loss goes down, resume is exact, DDP agrees."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guidesr.discriminators import DiscriminatorConfig
from guidesr.losses import LossConfig
from guidesr.train import TrainConfig, Trainer, learning_rate

ROOT = Path(__file__).resolve().parents[1]


def small_config(out: Path, **overrides) -> TrainConfig:
    config = TrainConfig(
        preset="tiny", random_base=True, data="sample", out=str(out), steps=6, batch_size=2, crop_size=64,
        lr=2e-3, warmup_steps=1, checkpoint_every=3, log_every=1,
        loss=LossConfig(w_lpips=0.0, w_gan=0.5), discriminator=DiscriminatorConfig(kind="patch", patch_channels=16),
    )
    return replace(config, **overrides)


def test_learning_rate_warmup_then_cosine():
    config = TrainConfig(lr=1e-3, warmup_steps=10, steps=110)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 60) == pytest.approx(0.5e-3)
    assert learning_rate(config, 110) == pytest.approx(0.0, abs=1e-12)


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    trainer = Trainer(small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0)))
    lq, hr = next(trainer.batches)
    losses = []
    for _ in range(8):
        trainer.optimizer.zero_grad()
        out = trainer.model(lq)
        loss, _ = trainer.criterion(out.r1, out.r2, hr, None)
        loss.backward()
        trainer.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = Trainer(small_config(tmp_path / "a")).fit(until=6)
    first = Trainer(small_config(tmp_path / "b"))
    first.fit(until=3)
    resumed = Trainer(small_config(tmp_path / "b"))
    assert resumed.step == 3
    second = resumed.fit(until=6)
    for key in ("total", "r1/mse", "r2/mse", "disc"):
        assert [s[key] for s in straight[3:]] == [s[key] for s in second], key
    a = load_file(tmp_path / "a" / "guidesr.safetensors")
    b = load_file(tmp_path / "b" / "guidesr.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_starts_its_own_log(tmp_path):
    """--no-resume into a folder that holds an earlier run's log replaces that log rather than appending to it."""
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit()
    Trainer(replace(config, resume=False)).fit()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]


def test_gan_term_and_shared_discriminator_are_trained(tmp_path):
    trainer = Trainer(small_config(tmp_path))
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    logs = trainer.train_step()
    assert logs["r1/gan"] > 0 and logs["r2/gan"] > 0 and logs["disc"] > 0
    after = list(trainer.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_lpips_without_weights_fails_at_start(tmp_path):
    with pytest.raises(Exception, match="(?i)lpips"):
        Trainer(small_config(tmp_path, loss=LossConfig(w_lpips=5.0, w_gan=0.0)))


def test_needs_base_model_unless_random(tmp_path):
    with pytest.raises(ValueError, match="--base-model"):
        Trainer(small_config(tmp_path, random_base=False))


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "guidesr.train", "--preset", "tiny", "--random-base", "--out", str(tmp_path / "run"),
        "--steps", "2", "--batch-size", "1", "--crop-size", "64", "--checkpoint-every", "2", "--warmup-steps", "1",
        "--w-lpips", "0", "--w-gan", "0", "--lr", "1e-3", "--save-every-rank",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / "run" / "rank0" / "guidesr.safetensors")
    rank1 = load_file(tmp_path / "run" / "rank1" / "guidesr.safetensors")
    initial = Trainer(small_config(tmp_path / "fresh")).model.trained_state_dict()
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)
