"""Prompt extractors: image -> text embedding F_p [B, L, D] for the UNet's cross-attention.

Two ship with guidesr. `StoredPromptEmbedding` (the default) is one learned [L, D] embedding kept in
the checkpoint, shared by every image. `CLIPPromptEncoder` encodes a user prompt once with the base
model's own CLIP text encoder (`text_encoder/` + `tokenizer/` in the base folder). An image-tagging
extractor such as the paper's RAM fits the same interface: a module whose forward takes the image
batch and returns [B, L, D]; it is not shipped because its weights cannot be fetched here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class StoredPromptEmbedding(nn.Module):
    def __init__(self, length: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        start = init.reshape(length, dim).clone() if init is not None else torch.randn(length, dim) * 0.02
        self.embedding = nn.Parameter(start)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(image.shape[0], -1, -1).to(image.dtype)


class CLIPPromptEncoder(nn.Module):
    """Encodes `prompt` with a local CLIP text encoder once; the result is a fixed buffer."""

    def __init__(self, base_dir: str | Path, prompt: str, length: int, dim: int):
        super().__init__()
        embedding = encode_prompt(base_dir, prompt, length)
        if embedding.shape != (1, length, dim):
            raise ValueError(
                f"text encoder in {base_dir} gives embeddings of shape {tuple(embedding.shape)}, "
                f"the UNet expects (1, {length}, {dim})"
            )
        self.register_buffer("embedding", embedding[0], persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(image.shape[0], -1, -1).to(image.dtype)


def encode_prompt(base_dir: str | Path, prompt: str, length: int) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    base_dir = Path(base_dir)
    for sub in ("text_encoder", "tokenizer"):
        if not (base_dir / sub).is_dir():
            raise FileNotFoundError(f"prompt encoding needs {base_dir / sub} (a diffusers-format base folder)")
    tokenizer = CLIPTokenizer.from_pretrained(base_dir / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(base_dir / "text_encoder", local_files_only=True,
                                            use_safetensors=True).eval()
    tokens = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids).last_hidden_state.float()
