"""GuideSR checkpoints: the trained parts as safetensors, described by a JSON file.

    NAME.json          {"format": "guidesr-checkpoint", "format_version": 1, "config": {...},
                        "tensors": "NAME.safetensors", "sha256": "...", "base_model": "tiny-base" | null, ...}
    NAME.safetensors   guidance branch, injection projections, VAE zero-convs, prompt embedding, LoRA

The base UNet/VAE weights are not part of a checkpoint; they come from a diffusers-format folder.
Nothing is unpickled: safetensors holds raw tensors and JSON holds everything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from runtime.cli import plural, write_whole_files

from .config import GuideSRConfig

FORMAT = "guidesr-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model; the message names why."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the model's state dict (name, dtype, shape, bytes): the weights a graph or engine of it
    holds. Unlike a checkpoint's sha256 it covers the base UNet and VAE (--base-model) and untrained weights too; it is
    taken of the model as loaded (LoRA not merged)."""
    return tensors_sha256(model.state_dict())


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors (name, dtype, shape and bytes of each, in name order, as contiguous CPU tensors): the
    same digest for the same values on any device and in any memory layout."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """NAME, NAME.json or NAME.safetensors -> (json path, safetensors path); another suffix is part of NAME."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def save_checkpoint(model: torch.nn.Module, path: str | Path, base_model: str | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write NAME.safetensors and NAME.json atomically; returns the JSON path."""
    json_path, tensor_path = checkpoint_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trained_state_dict().items()}
    data = save_tensors(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "tensors": tensor_path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "base_model": base_model,
        **(extra or {}),
    }
    write_whole_files({tensor_path: data, json_path: (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()})
    return json_path


def read_checkpoint_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Parse and validate NAME.json; returns the record and the tensors' path."""
    json_path, _ = checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint description {json_path} does not exist (a checkpoint is given as NAME, "
                              f"NAME.json or NAME.safetensors)")
    try:
        record = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{json_path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a GuideSR checkpoint (format {record.get('format')!r})"
                              if isinstance(record, dict) else f"{json_path} is not a GuideSR checkpoint")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path} has checkpoint format version {record.get('format_version')}, "
            f"this guidesr reads version {FORMAT_VERSION}"
        )
    tensors, config = record.get("tensors"), record.get("config")
    if not isinstance(tensors, str) or Path(tensors).name != tensors or tensors in ("", ".", ".."):
        raise CheckpointError(f"{json_path}: 'tensors' must name the safetensors file next to it, got {tensors!r}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{json_path}: 'config' must be an object of the model's settings, got {config!r}")
    base_model = record.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise CheckpointError(f"{json_path}: 'base_model' must be the base model folder's path or null, "
                              f"got {base_model!r}")
    return record, json_path.parent / tensors


def checkpoint_config(path: str | Path) -> GuideSRConfig:
    record, _ = read_checkpoint_record(path)
    try:
        return GuideSRConfig.from_dict(record["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: its config cannot be read: {err}") from err


def load_checkpoint(model: torch.nn.Module, path: str | Path, verify_hash: bool = True) -> str:
    """Load the trained parts into `model` (built from the same config); returns the tensors' sha256."""
    record, tensor_path = read_checkpoint_record(path)
    saved = record["config"]
    expected = model.config.to_dict()
    if saved.get("preset") != expected["preset"]:
        raise CheckpointError(
            f"checkpoint {path} is for preset {saved.get('preset')!r}, the model is preset {expected['preset']!r}"
        )
    differing = sorted(k for k in set(saved) | set(expected)
                       if k != "use_triton_kernels" and saved.get(k) != expected.get(k))
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {expected.get(k)!r}" for k in differing)
        raise CheckpointError(f"checkpoint {path} was trained with another config: {details}")
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint tensors {tensor_path} do not exist")
    digest = file_sha256(tensor_path)
    if verify_hash and digest != record.get("sha256"):
        raise CheckpointError(
            f"{tensor_path} is corrupted or was replaced: sha256 {digest[:12]}… does not match "
            f"{str(record.get('sha256'))[:12]}… recorded in {checkpoint_paths(path)[0].name}"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{tensor_path} cannot be read as safetensors: {err}") from err
    wanted = model.trained_state_dict()
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {plural(len(missing), 'missing tensor')} "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != wanted[name].shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(wanted[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    model.checkpoint_sha256 = digest
    return digest
