"""Issue 3: the trainer (tiny preset, random base, CPU): loss goes down, resume is exact, DDP agrees."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from guidesr.discriminators import DiscriminatorConfig
from guidesr.losses import LossConfig
from guidesr.train import (Distributed, TrainConfig, Trainer, learning_rate, load_train_state, parse_args,
                           save_train_state)
from helpers import save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def small_config(out: Path, **overrides) -> TrainConfig:
    config = TrainConfig(
        preset="tiny", random_base=True, data="sample", out=str(out), steps=6, batch_size=2, crop_size=64,
        lr=2e-3, warmup_steps=1, checkpoint_every=3, log_every=1,
        loss=LossConfig(w_lpips=0.0, w_gan=0.5), discriminator=DiscriminatorConfig(kind="patch", patch_channels=16),
    )
    return replace(config, **overrides)


def metrics_log(out: Path) -> list[dict]:
    """Every entry of OUT/metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_step(out: Path) -> int:
    """The step OUT/guidesr.json was saved at."""
    return json.loads((out / "guidesr.json").read_text())["training"]["step"]


def gradient_norm(parameters) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])).item()


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
    log = metrics_log(tmp_path / "b")
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_starts_its_own_log(tmp_path):
    """--no-resume into a folder that holds an earlier run's log replaces that log rather than appending to it."""
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit()
    Trainer(replace(config, resume=False)).fit()
    log = metrics_log(tmp_path)
    assert [entry["step"] for entry in log] == [1, 2]


def test_gan_term_and_shared_discriminator_are_trained(tmp_path):
    trainer = Trainer(small_config(tmp_path))
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    logs = trainer.train_step()
    assert logs["r1/gan"] > 0 and logs["r2/gan"] > 0 and logs["disc"] > 0
    after = list(trainer.discriminator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_clip_discriminator_trains_its_heads_and_its_backbone_stays_frozen(tmp_path):
    """The trainer switches gradients on for the parameters the discriminator's optimiser trains only: the frozen CLIP
    backbone gets no gradient in either step (a ViT-L's would cost ~1.2 GB, would never be cleared, nor reduced by
    DDP)."""
    clip = DiscriminatorConfig(kind="clip", clip_path=str(save_tiny_clip(tmp_path / "clip")), head_channels=8)
    trainer = Trainer(small_config(tmp_path / "run", discriminator=clip))
    heads_before = [p.detach().clone() for p in trainer.discriminator.heads.parameters()]
    logs = trainer.train_step()
    assert logs["disc"] > 0
    backbone = list(trainer.discriminator.backbone.parameters())
    assert not any(p.requires_grad for p in backbone)
    assert all(p.grad is None for p in backbone)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, trainer.discriminator.heads.parameters()))


def test_lpips_without_weights_fails_at_start(tmp_path):
    with pytest.raises(Exception, match="(?i)lpips"):
        Trainer(small_config(tmp_path, loss=LossConfig(w_lpips=5.0, w_gan=0.0)))


def test_needs_base_model_unless_random(tmp_path):
    with pytest.raises(ValueError, match="--base-model"):
        Trainer(small_config(tmp_path, random_base=False))


TORCHRUN_ARGS = ("--preset", "tiny", "--random-base", "--steps", "2", "--batch-size", "1", "--crop-size", "64",
                 "--checkpoint-every", "1", "--log-every", "1", "--warmup-steps", "1", "--w-lpips", "0", "--w-gan", "0",
                 "--lr", "1e-3")


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_ranks_end_with_identical_weights_and_log_their_mean_losses(tmp_path):
    """Each rank draws its own batches; both log, and rank 0 writes, the mean over the ranks of the loss terms that
    each computed (step 1, before the ranks' weights move: rank 0's and rank 1's own first steps, one process each)."""
    result = torchrun("-m", "guidesr.train", *TORCHRUN_ARGS, "--out", str(tmp_path / "run"), "--save-every-rank")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(tmp_path / "run" / "rank0" / "guidesr.safetensors")
    rank1 = load_file(tmp_path / "run" / "rank1" / "guidesr.safetensors")
    initial = Trainer(small_config(tmp_path / "fresh")).model.trained_state_dict()
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    config, _ = parse_args([*TORCHRUN_ARGS, "--out", str(tmp_path / "alone")])
    own = [Trainer(config, env=Distributed(rank=rank)).train_step() for rank in (0, 1)]
    for key in ("r1/mse", "r2/mse", "total"):
        assert logged[key] == pytest.approx((own[0][key] + own[1][key]) / 2, rel=1e-5), key
        assert logged[key] != pytest.approx(own[0][key], rel=1e-3), key


NAN_ON_RANK_1 = """
import sys
import torch
import torch.distributed as dist
from guidesr.train import Trainer, init_distributed, parse_args

config, _ = parse_args(sys.argv[1:])
env, device = init_distributed()
trainer = Trainer(config, env, device)


def second_batch_nan(batches):
    for micro, (lq, hr) in enumerate(batches):
        yield (torch.full_like(lq, float("nan")) if micro == 1 else lq), hr


if env.rank == 1:
    trainer.batches = second_batch_nan(trainer.batches)
try:
    trainer.fit()
finally:
    dist.destroy_process_group()
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    """Rank 1's second batch is NaN: both ranks raise FloatingPointError at step 2 naming rank 1, before logging or
    saving it (rank 1 raising alone, rank 0 would log step 2 and save the weights that rank 1's NaN gradients reached,
    or wait at its next all-reduce). The test starts the two ranks itself, with the environment torchrun gives them:
    torchrun stops the other ranks as soon as one fails, racing their own messages."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    try:
        for rank in (0, 1):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
            with (tmp_path / f"rank{rank}.err").open("w") as stderr:
                command = [sys.executable, str(script), *TORCHRUN_ARGS, "--out", str(tmp_path / "run")]
                ranks.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
        deadline = time.monotonic() + 180
        codes = [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    message = ("FloatingPointError: step 2: loss term r1/mse is nan (micro-batch 1 of 1, the mean over 2 ranks; not "
               "finite on rank 1); stopped before logging or saving it, the last checkpoint is at step 1")
    errors = [(tmp_path / f"rank{rank}.err").read_text() for rank in (0, 1)]
    assert codes == [1, 1], [error[-2000:] for error in errors]
    for error in errors:
        assert any(line.endswith(message) for line in error.splitlines()), error[-2000:]
    log = metrics_log(tmp_path / "run")
    assert [entry["step"] for entry in log] == [1]
    assert checkpoint_step(tmp_path / "run") == 1


# ---- the command line and the run folder ------------------------------------------------------

def cli(*args: str) -> list[str]:
    return ["--preset", "tiny", "--random-base", "--w-lpips", "0", *args]


def test_help_shows_defaults_of_zero(capsys):
    """A default of 0 is a default (0 == False once hid it): --seed, --num-workers and --min-lr-ratio show theirs."""
    from guidesr.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    entries = {}  # option -> its help, from the lines of the options list ("  --option ..." starts an entry)
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            entries[option] = line
        elif entries:
            entries[option] += line
    for option in ("--seed", "--num-workers", "--min-lr-ratio"):
        assert "(default: 0" in " ".join(entries[option].split()), entries[option]
    assert "default" not in entries["--save-every-rank"]  # a flag's False is still not shown


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: 0 must be >= 1"),
    (["--batch-size", "-1"], "--batch-size: -1 must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum: 0 must be >= 1"),
    (["--log-every", "0"], "--log-every: 0 must be >= 1"),
    (["--lr", "0"], "--lr: 0 must be > 0"),
    (["--lr", "nan"], "--lr: nan must be > 0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio: 2 must be >= 0 and <= 1"),
    (["--second-order-prob", "1.5"], "--second-order-prob: 1.5 must be >= 0 and <= 1"),
    (["--name", "sub/model"], "--name 'sub/model': a file name inside --out, without folders"),
    (["--name", ".."], "--name '..'"),
    (["--w-lpips", "1"], "--w-lpips > 0 needs --lpips-vgg FILE"),
    (["--discriminator", "clip"], "--discriminator clip needs --clip-path DIR"),
    (["--steps", "3", "--stop-at", "5"], "--stop-at 5 is past --steps 3, where the learning-rate schedule ends"),
])
def test_cli_refuses_bad_settings_before_any_work(args, message, capsys):
    from guidesr.train import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(cli(*args))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_setup_errors_are_messages_not_tracebacks(tmp_path, capsys):
    from guidesr.train import main

    (tmp_path / "notes.txt").write_text("not a folder")
    assert main(cli("--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))) == 2
    assert main(cli("--out", str(tmp_path / "notes.txt"))) == 2
    assert main(cli("--precision", "bf16", "--out", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err
    assert "missing" in err and "notes.txt is a file, not a folder" in err and "precision bf16 needs CUDA" in err
    assert not (tmp_path / "run").exists()  # nothing written by a run that could not start


def test_interrupt_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from guidesr.train import main

    def interrupted(self, until=None):
        self.step += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert main(cli("--out", str(tmp_path), "--steps", "4", "--w-gan", "0")) == 130
    assert "interrupted at step 1; no checkpoint was written; the same command resumes" in capsys.readouterr().err


def test_resume_refuses_other_settings_but_not_a_longer_run(tmp_path):
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit()
    with pytest.raises(ValueError, match=r"batch_size 2 -> 1; loss.w_mse 1.0 -> 2.0\): rerun with its settings"):
        Trainer(replace(config, batch_size=1, loss=LossConfig(w_mse=2.0, w_lpips=0.0, w_gan=0.0)))
    with pytest.raises(ValueError, match=r"loss.w_gan 0.0 -> 0.5"):  # a discriminator the state does not have
        Trainer(replace(config, loss=LossConfig(w_lpips=0.0, w_gan=0.5)))
    longer = Trainer(replace(config, steps=3, log_every=2))
    assert longer.step == 2
    Trainer(replace(config, batch_size=1, resume=False))  # --no-resume starts over with any settings


def test_resumed_log_drops_lines_after_the_checkpoint(tmp_path):
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=3, checkpoint_every=2)
    Trainer(config).fit(until=2)
    with (tmp_path / "metrics.jsonl").open("a") as log:  # a run stopped after logging step 3, before saving it
        log.write(json.dumps({"step": 3, "total": 1.0}) + "\n")
    Trainer(config).fit()
    log = metrics_log(tmp_path)
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert log[-1]["total"] != 1.0


def test_resumed_log_time_continues_from_the_state(tmp_path):
    """The log's time counts the seconds of every run since step 0; a state written before it was recorded
    counts as 0."""
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit(until=1)
    Trainer(config).fit()
    state = tmp_path / "state" / "state.json"
    record = json.loads(state.read_text())
    log = metrics_log(tmp_path)
    assert [entry["step"] for entry in log] == [1, 2]
    assert 0 < log[0]["time"] < log[1]["time"] == round(record["elapsed_s"], 2)
    del record["elapsed_s"]
    state.write_text(json.dumps(record))
    resumed = Trainer(config)
    assert resumed.step == 2 and resumed.elapsed_s == 0.0


def test_finished_run_rewrites_a_missing_checkpoint_and_a_torn_state_is_refused(tmp_path):
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit()
    weights = load_file(tmp_path / "guidesr.safetensors")
    assert (tmp_path / "guidesr.safetensors").stat().st_mode == (tmp_path / "guidesr.json").stat().st_mode
    state = tmp_path / "state"
    assert (state / "state.safetensors").stat().st_mode == (state / "state.json").stat().st_mode
    (tmp_path / "guidesr.json").unlink()
    (tmp_path / "guidesr.safetensors").unlink()
    assert Trainer(config).fit() == []  # nothing left to train ...
    again = load_file(tmp_path / "guidesr.safetensors")  # ... but the checkpoint is written again
    assert checkpoint_step(tmp_path) == 2
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    state = tmp_path / "state" / "state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 1'))
    with pytest.raises(ValueError, match="is torn: state.json is at step 1, its tensors at step 2"):
        Trainer(config)
    record = json.loads(state.read_text())
    del record["config"]
    state.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"state.json is incomplete \(lacks config\); --no-resume starts over"):
        Trainer(config)
    state.write_text("{")
    with pytest.raises(ValueError, match=r"state.json is not valid JSON .*--no-resume starts over"):
        Trainer(config)


def test_a_fresh_run_keeps_the_old_log_until_its_first_step(tmp_path, monkeypatch):
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), steps=2, checkpoint_every=2)
    Trainer(config).fit()
    before = (tmp_path / "metrics.jsonl").read_text()

    def failing_step(self):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        Trainer(replace(config, resume=False)).fit()
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --out"),
    (["--steps", "0"], "argument --steps: 0 must be >= 1"),
    (["--steps", "-1"], "argument --steps: -1 must be >= 1"),
    (["--lr", "nan"], "argument --lr: nan must be > 0"),
    (["--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["--crop", "13"], "--crop must be a positive multiple of 8"),
    (["--crop", "1024"], "is too small"),
])
def test_pretrain_base_refuses_bad_arguments_before_training(argv, message, tmp_path, capsys, monkeypatch):
    """guidesr.pretrain_base: no silent default --out (it was the embedded demo's base), no traceback after setup."""
    import guidesr.pretrain_base as pretrain_base

    monkeypatch.setattr(pretrain_base, "make_tiny_base", lambda *a, **k: pytest.fail("training started"))
    out = [] if not argv else ["--out", str(tmp_path / "base")]
    with pytest.raises(SystemExit) as exit_info:
        pretrain_base.main([*out, *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m guidesr.pretrain_base") and message in err


def test_pretrain_base_refuses_an_out_below_a_file(tmp_path, capsys, monkeypatch):
    import guidesr.pretrain_base as pretrain_base

    monkeypatch.setattr(pretrain_base, "make_tiny_base", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_base.main(["--out", str(tmp_path / "file" / "base"), "--steps", "1"])
    assert exit_info.value.code == 2 and f"{tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_pretrain_base_writes_a_loadable_base_with_ordinary_file_modes(tmp_path):
    """safetensors creates its files 0600; the base's weights get the mode the umask gives config.json."""
    import os

    from diffusers import AutoencoderKL

    import guidesr.pretrain_base as pretrain_base

    umask = os.umask(0o022)
    try:
        pretrain_base.make_tiny_base(tmp_path / "base", steps=1, seed=0, crop=32, batch=1, lr=1e-4)
    finally:
        os.umask(umask)
    weights = sorted((tmp_path / "base").glob("*/*.safetensors"))
    assert [w.parent.name for w in weights] == ["unet", "vae"]
    assert {w.stat().st_mode & 0o777 for w in weights} == {0o644}
    AutoencoderKL.from_pretrained(tmp_path / "base" / "vae", use_safetensors=True)


def test_learning_rate_reaches_the_peak_after_warm_up_and_ends_at_the_floor():
    config = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(config, 10) == pytest.approx(1e-3)  # the first step after warm-up: the peak, not above
    assert learning_rate(config, 60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(config, 110) == pytest.approx(1e-4)
    assert learning_rate(config, 150) == pytest.approx(1e-4)  # past --steps: stays at the floor


def test_the_optimizer_runs_the_schedule_and_a_resumed_run_with_grad_accum_continues_the_batch_stream(tmp_path):
    config = small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), batch_size=1, grad_accum=2, steps=3,
                          warmup_steps=2, checkpoint_every=1)
    straight = Trainer(config)
    straight.fit(until=1)  # two micro-batches
    assert straight.optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(config, 0)) == config.lr / 2
    resumed = Trainer(config)
    assert resumed.step == 1
    for (lq_a, hr_a), (lq_b, hr_b) in zip((next(straight.batches), next(straight.batches)),
                                          (next(resumed.batches), next(resumed.batches))):
        assert torch.equal(lq_a, lq_b) and torch.equal(hr_a, hr_b)


def test_only_where_and_how_long_a_run_goes_may_change_on_resume():
    import dataclasses

    from guidesr.train import config_changes

    config = small_config(Path("run"))
    saved = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    allowed = replace(config, out="elsewhere", name="other", steps=12, checkpoint_every=5, log_every=3, num_workers=2,
                      save_every_rank=True, resume=False)
    assert config_changes(saved, allowed) == []
    changed = replace(config, lr=1e-4, grad_accum=2, seed=1, warmup_steps=5, min_lr_ratio=0.1, crop_size=32)
    assert [change.split()[0] for change in config_changes(saved, changed)] == [
        "crop_size", "grad_accum", "lr", "min_lr_ratio", "seed", "warmup_steps"]


def test_the_training_state_keeps_the_fp16_loss_scale(tmp_path):
    """A resumed fp16 run goes on at the loss scale it had reached, not at the initial 2**16 (whose overflows would
    skip its first optimiser steps)."""
    trainer = Trainer(small_config(tmp_path / "run"))
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict({**scaler.state_dict(), "scale": 512.0, "_growth_tracker": 17})
    parts = (trainer.model, trainer.discriminator, trainer.optimizer, trainer.disc_optimizer)
    save_train_state(tmp_path / "state", 1, 0.0, *parts, scaler, trainer.config)
    resumed = torch.amp.GradScaler("cpu")
    load_train_state(tmp_path / "state", *parts, resumed)
    assert resumed.state_dict() == scaler.state_dict()


def test_saving_the_training_state_never_writes_through_a_link_planted_at_a_temporary_name(tmp_path):
    """The state's temporaries are new files (O_EXCL) with random names: links at the names a save once used are
    left alone, and the file they point to is not written."""
    trainer = Trainer(small_config(tmp_path / "run"))
    parts = (trainer.model, trainer.discriminator, trainer.optimizer, trainer.disc_optimizer)
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("not the run's")
    for name in ("state.json.tmp", "state.safetensors.tmp"):
        (state / name).symlink_to(victim)
    scaler = torch.amp.GradScaler("cpu")
    save_train_state(state, 3, 1.5, *parts, scaler, trainer.config)
    assert victim.read_text() == "not the run's"
    assert sorted(path.name for path in state.iterdir()) == ["state.json", "state.json.tmp", "state.safetensors",
                                                             "state.safetensors.tmp"]
    assert load_train_state(state, *parts, scaler) == (3, 1.5)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_under_ddp_a_step_all_reduces_each_models_gradients_once_whatever_the_grad_accum(tmp_path, max_grad_norm):
    """The generator's and the discriminator's micro-batches but the last accumulate their gradients locally
    (no_sync); a one-process gloo group stands in for the ranks, a comm hook counts the all-reduces. Clipping works on
    the all-reduced gradients and adds no collective."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        config = small_config(tmp_path / "run", batch_size=1, grad_accum=3, max_grad_norm=max_grad_norm)
        trainer = Trainer(config, env=Distributed(0, 2, 0))
        reductions = {"generator": 0, "discriminator": 0}

        def counting(name):
            def hook(_, bucket):
                reductions[name] += bucket.is_last()
                future = torch.futures.Future()
                future.set_result(bucket.buffer())
                return future
            return hook

        trainer.ddp_model.register_comm_hook(None, counting("generator"))
        trainer.ddp_disc.register_comm_hook(None, counting("discriminator"))
        logs = trainer.train_step()
    finally:
        dist.destroy_process_group()
    assert reductions == {"generator": 1, "discriminator": 1}
    if max_grad_norm is not None:
        assert logs["grad_norm"] > max_grad_norm and logs["disc_grad_norm"] > max_grad_norm
        assert gradient_norm(trainer.model.parameters()) == pytest.approx(max_grad_norm, rel=1e-4)
        assert gradient_norm(trainer.discriminator.parameters()) == pytest.approx(max_grad_norm, rel=1e-4)


def test_a_run_longer_than_a_ranks_own_batches_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="^8388608 steps of 3 micro-batches on 1 rank: .* distinct micro-batches"):
        Trainer(small_config(tmp_path, steps=2**23, grad_accum=3))


def test_the_training_state_holds_a_clip_discriminators_heads_not_its_frozen_backbone(tmp_path):
    """A ViT-L backbone is ~1.2 GB that never changes and comes from --clip-path: no checkpoint writes it."""
    clip = DiscriminatorConfig(kind="clip", clip_path=str(save_tiny_clip(tmp_path / "clip")), head_channels=8)
    config = small_config(tmp_path / "run", discriminator=clip, steps=1, checkpoint_every=1)
    trainer = Trainer(config)
    trainer.fit()
    saved = load_file(tmp_path / "run" / "state" / "state.safetensors")
    assert any(k.startswith("discriminator.heads.") for k in saved)
    assert not any(k.startswith("discriminator.backbone.") for k in saved)
    resumed = Trainer(config).discriminator.state_dict()
    assert all(torch.equal(tensor, resumed[name]) for name, tensor in trainer.discriminator.state_dict().items())


# ---- GPU-scale training: host syncs, non-finite losses, clipping, decay groups, the discriminator's schedule -----

HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


def test_a_step_reads_its_losses_to_the_host_once_and_logs_what_per_micro_batch_reads_did(tmp_path, monkeypatch):
    """Each read of a device tensor's value on the host (.item(), .tolist(), float(), ...) waits for a GPU's queue: a
    step makes one, not one per loss term and micro-batch, and logs bit for bit the averages that per-term .item()
    reads summed in Python gave (the demo model's metrics.jsonl). AdamW's step counters are host tensors on a GPU too:
    their reads are no wait and are not counted."""
    import guidesr.train as train

    trainer = Trainer(small_config(tmp_path, batch_size=1, grad_accum=3))
    trainer.batches = iter([next(trainer.batches) for _ in range(3)])  # the degradations' own reads happen here
    computed: list[dict[str, torch.Tensor]] = []
    criterion, disc_loss = trainer.criterion, train.discriminator_loss

    def recorded_criterion(*args):
        loss, terms = criterion(*args)
        computed.append({key: value.detach().clone() for key, value in terms.items()})
        return loss, terms

    def recorded_disc_loss(*args):
        loss = disc_loss(*args)
        computed.append({"disc": loss.detach().clone()})
        return loss

    trainer.criterion = recorded_criterion
    monkeypatch.setattr(train, "discriminator_loss", recorded_disc_loss)
    reads = []
    for name in HOST_READS:
        def counting(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            reads.append((_name, self))
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    logs = trainer.train_step()
    monkeypatch.undo()
    step_counters = [state["step"] for optimizer in (trainer.optimizer, trainer.disc_optimizer)
                     for state in optimizer.state.values()]
    assert [name for name, tensor in reads if not any(tensor is counter for counter in step_counters)] == ["tolist"]
    expected: dict[str, float] = {}
    for terms in computed:
        for key, value in terms.items():
            expected[key] = expected.get(key, 0.0) + value.item() / 3
    assert len(computed) == 6 and logs == {**expected, "lr": trainer.config.lr}


def test_a_non_finite_loss_stops_the_run_naming_its_step_and_term_before_logging_or_saving_it(tmp_path):
    config = small_config(tmp_path, batch_size=1, grad_accum=2, steps=3, checkpoint_every=1)
    trainer = Trainer(config)
    clean = trainer.batches

    def poisoned():
        for micro, (lq, hr) in enumerate(clean):
            yield (torch.full_like(lq, float("nan")) if micro == 3 else lq), hr

    trainer.batches = poisoned()
    with pytest.raises(FloatingPointError, match=r"^step 2: loss term r1/mse is nan \(micro-batch 2 of 2\); stopped "
                                                 r"before logging or saving it, the last checkpoint is at step 1$"):
        trainer.fit()
    log = metrics_log(tmp_path)
    assert [entry["step"] for entry in log] == [1]
    assert checkpoint_step(tmp_path) == 1


def test_a_non_finite_gradient_norm_with_finite_losses_stops_the_run_before_logging_or_saving(tmp_path):
    """An overflow in the backward pass only (here: one weight's gradient made infinite by a hook) leaves every loss
    term finite; the clipped update is then NaN, which used to be logged as null and saved."""
    config = small_config(tmp_path, batch_size=1, steps=2, checkpoint_every=1, max_grad_norm=1.0)
    trainer = Trainer(config)
    trainer.fit(until=1)
    weight = next(param for param in trainer.model.parameters() if param.requires_grad)
    weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(FloatingPointError, match=r"^step 2: grad_norm is (inf|nan) with finite loss terms, so the "
                                                 r"step's update made the weights non-finite; stopped before logging "
                                                 r"or saving it, the last checkpoint is at step 1$"):
        trainer.fit()
    log = metrics_log(tmp_path)
    assert [entry["step"] for entry in log] == [1]
    assert checkpoint_step(tmp_path) == 1


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    trainer = Trainer(small_config(tmp_path, batch_size=1, steps=1))
    name, weight = next((name, param) for name, param in trainer.model.named_parameters() if param.requires_grad)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"^step 0: 1 trained weight tensor not finite \({re.escape(name)}\); "
                                                 r"not saved, the last checkpoint is at step 0$"):
        trainer.save()
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_metrics_lines_are_strict_json_with_null_for_values_that_are_not_finite():
    """Under fp16 a step that GradScaler skips has non-finite loss terms or gradient norms; Python's json would write
    them as NaN and Infinity, which strict JSON parsers refuse."""
    from guidesr.train import log_line

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    line = log_line({"step": 3, "time": 1.5, "total": float("nan"), "grad_norm": float("inf"), "lr": 1e-4})
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line, parse_constant=refuse) == {"step": 3, "time": 1.5, "total": None, "grad_norm": None,
                                                       "lr": 1e-4}


def test_max_grad_norm_clips_each_models_whole_step_gradient_and_is_off_by_default(tmp_path):
    config = small_config(tmp_path, batch_size=1, grad_accum=2)
    assert config.max_grad_norm is None
    unclipped = Trainer(config)
    logs = unclipped.train_step()
    assert "grad_norm" not in logs and "disc_grad_norm" not in logs
    generator_norm = gradient_norm(unclipped.model.parameters())
    disc_norm = gradient_norm(unclipped.discriminator.parameters())
    assert generator_norm > 1e-3 and disc_norm > 1e-3

    clipped = Trainer(replace(config, out=str(tmp_path / "clipped"), max_grad_norm=1e-3))
    logs = clipped.train_step()
    assert logs["grad_norm"] == pytest.approx(generator_norm, rel=1e-5)
    assert logs["disc_grad_norm"] == pytest.approx(disc_norm, rel=1e-5)
    assert gradient_norm(clipped.model.parameters()) == pytest.approx(1e-3, rel=1e-4)
    assert gradient_norm(clipped.discriminator.parameters()) == pytest.approx(1e-3, rel=1e-4)


def test_weight_decay_scope_matrices_spares_biases_and_the_prompt_embedding_in_both_models(tmp_path):
    """With zero gradients an AdamW step is its weight decay alone: every trained parameter shrinks by default,
    only the matrices (LoRA, conv kernels, the discriminator's) with scope "matrices"."""
    def shrunk_parameters(scope: str) -> set[str]:
        trainer = Trainer(small_config(tmp_path / scope, weight_decay_scope=scope))
        assert trainer.disc_optimizer.param_groups[0]["weight_decay"] == 1e-2  # AdamW's default, as before
        shrunk = set()
        for prefix, module, optimizer in (("", trainer.model, trainer.optimizer),
                                          ("disc.", trainer.discriminator, trainer.disc_optimizer)):
            trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
            before = {name: p.detach().clone() for name, p in trained.items()}
            for p in trained.values():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            shrunk |= {prefix + name for name, p in trained.items() if not torch.equal(p, before[name])}
        return shrunk

    everything = shrunk_parameters("all")
    matrices = shrunk_parameters("matrices")
    spared = everything - matrices
    assert "prompt.embedding" in spared and "disc.net.0.bias" in spared and "guidance.head.bias" in spared
    assert all(name == "prompt.embedding" or name.endswith(".bias") for name in spared)
    assert "guidance.head.weight" in matrices and "disc.net.0.parametrizations.weight.original" in matrices
    assert any("lora_A" in name for name in matrices) and matrices < everything


def test_the_discriminator_follows_the_generators_lr_schedule_only_when_asked(tmp_path):
    from guidesr.train import discriminator_learning_rate

    config = small_config(tmp_path, warmup_steps=2, steps=4, disc_lr=1e-4)
    assert [discriminator_learning_rate(config, step) for step in range(4)] == [1e-4] * 4
    scheduled = replace(config, disc_lr_schedule="generator")
    assert [discriminator_learning_rate(scheduled, step) for step in range(5)] == pytest.approx(
        [5e-5, 1e-4, 1e-4, 5e-5, 0.0], abs=1e-12)
    trainer = Trainer(replace(scheduled, batch_size=1))
    trainer.train_step()
    assert trainer.disc_optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)


def test_cli_sets_the_gpu_scale_training_options():
    from guidesr.train import parse_args

    config, _ = parse_args(cli())
    assert (config.max_grad_norm, config.weight_decay_scope, config.disc_lr_schedule, config.disc_weight_decay) == (
        None, "all", "constant", 1e-2)
    config, _ = parse_args(cli("--max-grad-norm", "1", "--weight-decay-scope", "matrices", "--disc-lr-schedule",
                               "generator", "--disc-weight-decay", "0"))
    assert (config.max_grad_norm, config.weight_decay_scope, config.disc_lr_schedule, config.disc_weight_decay) == (
        1.0, "matrices", "generator", 0.0)


def test_grad_accum_steps_on_the_mean_of_its_micro_batches_gradients(tmp_path):
    """--grad-accum k divides each micro-batch's loss by k: the step's gradient is the mean of the k micro-batches'
    gradients, as one k times larger batch gives, not their sum (which AdamW would barely show, but --max-grad-norm
    would clip k times harder)."""
    trainer = Trainer(small_config(tmp_path, loss=LossConfig(w_lpips=0.0, w_gan=0.0), batch_size=1, grad_accum=2))
    batches = [next(trainer.batches) for _ in range(2)]
    for lq, hr in batches:
        out = trainer.model(lq)
        trainer.criterion(out.r1, out.r2, hr, None)[0].backward()
    summed = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.batches = iter(batches)
    trainer.train_step()
    stepped = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    assert stepped.keys() == summed.keys() and any(grad.abs().sum() > 0 for grad in summed.values())
    for name, grad in stepped.items():
        torch.testing.assert_close(grad, summed[name] / 2, msg=name)
