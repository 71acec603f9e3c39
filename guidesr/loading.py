"""Building a GuideSR from a preset, a local diffusers-format base folder and a checkpoint.

A base folder is what `save_pretrained` writes (and what SD-Turbo's repository holds):

    BASE/unet/{config.json, diffusion_pytorch_model.safetensors}
    BASE/vae/{config.json, diffusion_pytorch_model.safetensors}
    BASE/text_encoder/, BASE/tokenizer/      (optional: prompt encoding with CLIP)

Only local folders are read; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError, checkpoint_config, load_checkpoint, read_checkpoint_record
from .config import GuideSRConfig, preset_config
from .prompt import CLIPPromptEncoder, StoredPromptEmbedding

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .model import GuideSR

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "guidesr-tiny.json"

# Config fields of the base modules that decide parameter shapes; a base folder must agree on all.
_SHAPE_FIELDS = {
    "unet": ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups"),
    "vae": ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "latent_channels", "norm_num_groups"),
}


class BaseModelError(ValueError):
    """A base folder that is missing, incomplete or of other shapes than the preset."""


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_base_modules(config: GuideSRConfig, base_dir: str | Path) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # seconds to import: not at a command's `--help`

    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise BaseModelError(f"base model folder {base_dir} does not exist")
    modules = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        folder = base_dir / name
        if not (folder / "config.json").is_file():
            raise BaseModelError(
                f"base model folder {base_dir} has no {name}/config.json; expected a diffusers-format "
                f"folder with unet/ and vae/ (as written by save_pretrained)"
            )
        found = cls.load_config(folder)
        expected = getattr(config, name)
        mismatched = [
            f"{key}: folder {found.get(key)!r} vs preset {expected.get(key)!r}"
            for key in _SHAPE_FIELDS[name]
            if key in expected and _normalise(found.get(key)) != _normalise(expected.get(key))
        ]
        if mismatched:
            raise BaseModelError(
                f"{folder} does not have the shapes of preset {config.preset!r}: " + "; ".join(mismatched)
            )
        try:
            modules[name] = cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False,
                                                 use_safetensors=True)  # never unpickle a .bin
        except (OSError, ValueError, RuntimeError) as err:
            pickled = not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin"))
            hint = (" (it holds only pickled .bin weights, which guidesr does not load: re-save them with "
                    "save_pretrained(..., safe_serialization=True) where you trust the file)") if pickled else ""
            raise BaseModelError(f"cannot load {name} weights from {folder}: {err}{hint}") from err
    return modules["unet"], modules["vae"]


def has_text_encoder(base_dir: str | Path) -> bool:
    return all((Path(base_dir) / sub).is_dir() for sub in ("text_encoder", "tokenizer"))


def build_model(config: GuideSRConfig, base_dir: str | Path | None = None, prompt_text: str | None = None,
                seed: int = 0, prompt_init: str | None = None) -> GuideSR:
    """A GuideSR with base weights from `base_dir` (or random ones when None) and fresh trainable parts.

    `prompt_text`: a fixed prompt, encoded once by the base folder's CLIP text encoder. `prompt_init`:
    the learned prompt embedding starts from that encoding of this text instead of N(0, 0.02) noise.
    """
    if prompt_text is not None and prompt_init is not None:
        raise ValueError("prompt_text (a fixed prompt) and prompt_init (a learned one's start) exclude each other")
    from .model import GuideSR  # imports diffusers and peft (seconds): not at a command's `--help`

    unet = vae = prompt = None
    if (prompt_text is not None or prompt_init is not None) and base_dir is None:
        raise BaseModelError("a text prompt needs a base model folder with text_encoder/ and tokenizer/")
    if base_dir is not None:
        unet, vae = load_base_modules(config, base_dir)
        if prompt_text is not None:
            prompt = CLIPPromptEncoder(base_dir, prompt_text, config.prompt_length, config.text_dim)
        elif prompt_init is not None:
            start = CLIPPromptEncoder(base_dir, prompt_init, config.prompt_length, config.text_dim).embedding
            prompt = StoredPromptEmbedding(config.prompt_length, config.text_dim, init=start)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GuideSR(config, unet=unet, vae=vae, prompt=prompt)


def load_model(checkpoint: str | Path | None = None, preset: str | None = None,
               base_model: str | Path | None = None, device: str | torch.device = "cpu") -> GuideSR:
    """The model a user asks for, in eval mode.

    checkpoint None -> the embedded demo model (tiny preset, trained on the scikit-image photos).
    base_model overrides the base folder the checkpoint names (resolved next to the checkpoint).
    preset, when given, must match the checkpoint's.
    """
    default = checkpoint is None
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    config = checkpoint_config(checkpoint)
    if preset is not None and preset != config.preset:
        hint = (f" (the embedded demo model, used when no checkpoint is given); pass a {preset} checkpoint "
                f"(--checkpoint NAME.json)" if default else "")
        raise CheckpointError(f"checkpoint {checkpoint} is for preset {config.preset!r}, not {preset!r}{hint}")
    if base_model is None:
        record, _ = read_checkpoint_record(checkpoint)
        if record.get("base_model") is None:
            raise BaseModelError(
                f"checkpoint {checkpoint} names no base model; pass --base-model DIR "
                f"(a local diffusers folder with unet/ and vae/)"
            )
        base_model = checkpoint.parent / record["base_model"]
    model = build_model(config, base_model)
    load_checkpoint(model, checkpoint)
    return model.to(device).eval()


def load_default_model(device: str | torch.device = "cpu") -> GuideSR:
    return load_model(None, device=device)


def model_for_preset(preset: str, base_model: str | Path | None = None) -> GuideSR:
    """A fresh (untrained) GuideSR of a preset: random base weights unless a base folder is given."""
    return build_model(preset_config(preset), base_model)
