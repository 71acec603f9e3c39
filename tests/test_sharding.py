"""runtime.sharding: the split itself, and `torchrun --nproc_per_node 2 -m runtime.upscale` on the CPU,
killed midway and rerun."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.imageio import read_image
from runtime.sharding import Shard, ShardingError, device_for_shard, shard_from_env, shard_items

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.parametrize("count", [0, 1, 5, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_every_item_goes_to_exactly_one_rank(count, world_size):
    items = [f"image{i:03d}.png" for i in range(count)]
    parts = [shard_items(items, Shard(rank, world_size, rank)) for rank in range(world_size)]
    assert sorted(sum(parts, [])) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert parts == [shard_items(items, Shard(rank, world_size, rank)) for rank in range(world_size)]  # deterministic


def test_shard_from_torchrun_environment():
    assert shard_from_env({}) == Shard(0, 1, 0)
    assert shard_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(3, 4, 1)
    assert Shard(3, 4, 1).label == "[rank 3/4] " and Shard().label == ""
    with pytest.raises(ShardingError, match="RANK must be in"):
        shard_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ShardingError, match="not an integer"):
        shard_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_one_device_per_rank():
    assert device_for_shard(torch.device("cpu"), Shard(1, 2, 1)) == torch.device("cpu")
    assert device_for_shard(torch.device("cuda", 0), Shard(1, 2, 1)) == torch.device("cuda", 0)  # explicit index kept
    if torch.cuda.device_count() >= 2:
        assert device_for_shard(torch.device("cuda"), Shard(1, 2, 1)) == torch.device("cuda", 1)


# ------------------------------------------------------------------------------------ torchrun, CPU


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "pid (comm) state"
        if parent == pid:
            found.append(int(entry.name))
    return found


def torchrun_command(in_dir: Path, out_dir: Path, checkpoint: Path) -> list[str]:
    return [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
            "-m", "runtime.upscale", str(in_dir), "-o", str(out_dir), "--checkpoint", str(checkpoint),
            "--device", "cpu"]


def wrote_by_rank(output: str) -> dict[int, list[str]]:
    by_rank: dict[int, list[str]] = {0: [], 1: []}
    for rank, path in re.findall(r"\[rank (\d)/2\] wrote (\S+)", output):
        by_rank[int(rank)].append(Path(path).name)
    return by_rank


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from test_upscale_cli import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_torchrun_splits_a_folder_and_a_rerun_after_a_kill_finishes_it(tmp_path, checkpoint):
    """Acceptance 6: 2 CPU ranks; killed after the first outputs appear; the rerun does exactly the rest."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    rng = np.random.default_rng(3)
    names = [f"img{i:02d}" for i in range(10)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(in_dir / f"{name}.png")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    # Run 1, killed (SIGKILL to both workers) as soon as the first outputs exist.
    first = subprocess.Popen(torchrun_command(in_dir, out_dir, checkpoint), cwd=REPO, env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out_dir.is_dir() and any(out_dir.glob("*.png"))):
            assert first.poll() is None, "torchrun ended before any output appeared"
            assert time.monotonic() < deadline, "no output after 240 s"
            time.sleep(0.05)
        workers = children_of(first.pid)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        first_output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode != 0
    done_before = sorted(p.stem for p in out_dir.glob("*.png"))
    assert 0 < len(done_before) < len(names), "the kill came too late to leave work for the rerun"
    assert [p.name for p in out_dir.iterdir() if not p.name.endswith(".png")] == []  # no partial files

    # Run 2: finishes the rest; what run 1 wrote is skipped, not redone.
    second = subprocess.run(torchrun_command(in_dir, out_dir, checkpoint), cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    wrote = wrote_by_rank(second.stdout)
    assert not set(wrote[0]) & set(wrote[1]), "a file was done by both ranks"
    redone = sorted(Path(name).stem for name in wrote[0] + wrote[1])
    assert redone == sorted(set(names) - set(done_before)), "the rerun did not do exactly the missing files"
    assert second.stdout.count("skip:") == len(done_before)
    # The split is the deterministic one: rank r takes sorted files r, r + 2, ...
    for rank in (0, 1):
        assert set(wrote[rank]) <= {f"{name}.png" for name in names[rank::2]}
    assert sorted(p.stem for p in out_dir.iterdir()) == names
    for name in names:
        assert read_image(out_dir / f"{name}.png")[0].shape == (80, 96, 3)
    # Run 1's completed files were also split without overlap.
    first_wrote = wrote_by_rank(first_output)
    assert not set(first_wrote[0]) & set(first_wrote[1])


def test_several_nodes_split_by_global_rank_not_local_rank():
    """2 nodes x 2 processes: LOCAL_RANK repeats across nodes; the split must follow RANK."""
    items = [f"image{i:03d}.png" for i in range(11)]
    parts = [shard_items(items, Shard(rank, 4, rank % 2)) for rank in range(4)]
    assert parts == [items[rank::4] for rank in range(4)]
    assert sorted(sum(parts, [])) == items


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = torch.device("cuda")
    assert device_for_shard(cuda, Shard(3, 4, 1)) == torch.device("cuda", 1)  # second node, second GPU
    assert device_for_shard(cuda, Shard(2, 4, 0)) == torch.device("cuda", 0)
    assert device_for_shard(cuda, Shard()) == cuda  # a single process keeps what it was given
    with pytest.raises(ShardingError, match="LOCAL_RANK 2 has no GPU: this node has 2"):
        device_for_shard(cuda, Shard(2, 3, 2))


def test_local_rank_defaults_to_rank():
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2, 1)
    assert shard_from_env({"RANK": "", "WORLD_SIZE": ""}) == Shard(0, 1, 0)  # empty: unset
