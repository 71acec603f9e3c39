"""LoRA merge for export: the exported graph holds plain weights W' = W + (alpha / r) * B @ A.

`GuideSR.merge_lora` folds every LoRA update with peft's `merge_and_unload`, which also swaps each
peft `LoraLayer` back for the plain `nn.Conv2d` / `nn.Linear` it wrapped. The zero-convs (VAE skips)
and the injection projections are ordinary layers from the start and are left as they are.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from guidesr.model import GuideSR


def merged_copy(model: GuideSR) -> GuideSR:
    """A copy of `model` with LoRA folded into the base weights; `model` itself is not changed."""
    merged = copy.deepcopy(model)
    merged.merge_lora()
    leftovers = lora_layer_names(merged)
    if leftovers:
        raise RuntimeError(f"LoRA layers survived merge_and_unload: {leftovers[:5]}")
    return merged


def inference_copy(model: GuideSR, device: torch.device, dtype: torch.dtype) -> GuideSR:
    """What the compiled backend runs: a merged copy, gradients off, eval, `dtype` channels_last on `device`."""
    prepared = merged_copy(model).requires_grad_(False).eval()
    return prepared.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def lora_layer_names(model: nn.Module) -> list[str]:
    """Names of the peft LoRA layers still in `model` (none after a merge)."""
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
