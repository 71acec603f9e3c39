"""The CLIP prompt extractor: a user prompt encoded once by the base folder's own text encoder."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guidesr.config import tiny_config
from guidesr.loading import BaseModelError, build_model
from guidesr.prompt import CLIPPromptEncoder, StoredPromptEmbedding


@pytest.fixture(scope="module")
def base_with_text_encoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_clip")
    config = tiny_config()
    UNet2DConditionModel(**config.unet).save_pretrained(root / "unet")
    AutoencoderKL(**config.vae).save_pretrained(root / "vae")
    words = ["a", "cat", "photo", "of", "sharp"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for word in words:
        vocab[word + "</w>"] = len(vocab)
    for char in sorted({c for w in words for c in w}):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")).save_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=config.text_dim, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    return root


def test_prompt_is_encoded_once_by_the_base_text_encoder(base_with_text_encoder):
    model = build_model(tiny_config(), base_with_text_encoder, prompt_text="a sharp photo of a cat")
    assert isinstance(model.prompt, CLIPPromptEncoder)
    image = torch.zeros(2, 3, 32, 32)
    embedding = model.prompt(image)
    assert embedding.shape == (2, 77, tiny_config().text_dim)
    other = CLIPPromptEncoder(base_with_text_encoder, "a cat", 77, tiny_config().text_dim)
    assert not torch.equal(other(image), embedding)  # the prompt text matters
    assert not any(n.startswith("prompt.") for n, _ in model.trainable_parameters())  # fixed, not trained
    with torch.no_grad():
        assert model.eval()(image * 0).r1.shape == image.shape


def test_default_is_the_stored_embedding_and_prompt_needs_a_text_encoder(tmp_path):
    assert isinstance(build_model(tiny_config()).prompt, StoredPromptEmbedding)
    with pytest.raises(BaseModelError, match="text_encoder"):
        build_model(tiny_config(), None, prompt_text="a cat")
    config = tiny_config()
    UNet2DConditionModel(**config.unet).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**config.vae).save_pretrained(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        build_model(config, tmp_path, prompt_text="a cat")


def test_learned_prompt_starts_from_the_text_encoding(base_with_text_encoder):
    encoded = CLIPPromptEncoder(base_with_text_encoder, "", 77, tiny_config().text_dim).embedding
    model = build_model(tiny_config(), base_with_text_encoder, prompt_init="")
    assert isinstance(model.prompt, StoredPromptEmbedding)
    torch.testing.assert_close(model.prompt.embedding.detach(), encoded, rtol=0, atol=0)
    assert any(n.startswith("prompt.") for n, _ in model.trainable_parameters())  # learned from there
    other = build_model(tiny_config(), base_with_text_encoder, prompt_init="a cat").prompt.embedding
    assert not torch.equal(other, model.prompt.embedding)
    with pytest.raises(ValueError, match="exclude each other"):
        build_model(tiny_config(), base_with_text_encoder, prompt_text="a cat", prompt_init="")
    with pytest.raises(BaseModelError, match="text_encoder"):
        build_model(tiny_config(), None, prompt_init="a cat")


def test_trainer_prompt_start_and_degradation_option(base_with_text_encoder, tmp_path):
    from guidesr.train import Trainer, TrainConfig, parse_args

    assert Trainer.prompt_start(TrainConfig(base_model=str(base_with_text_encoder))) == ""
    assert Trainer.prompt_start(TrainConfig(base_model=str(base_with_text_encoder), prompt_init=None)) is None
    assert Trainer.prompt_start(TrainConfig(random_base=True)) is None
    config = tiny_config()
    UNet2DConditionModel(**config.unet).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**config.vae).save_pretrained(tmp_path / "vae")
    assert Trainer.prompt_start(TrainConfig(base_model=str(tmp_path))) is None  # no text encoder: random start
    assert Trainer.prompt_start(TrainConfig(base_model=str(tmp_path), prompt_init="a cat")) == "a cat"  # build fails
    no_lpips = ["--w-lpips", "0"]
    assert parse_args([*no_lpips, "--prompt-init", "a photo"])[0].prompt_init == "a photo"
    assert parse_args([*no_lpips, "--prompt-init-random"])[0].prompt_init is None
    assert parse_args(no_lpips)[0].prompt_init == ""
    assert parse_args(no_lpips)[0].degradation.second_order_prob == 1.0
    assert parse_args([*no_lpips, "--second-order-prob", "0.5"])[0].degradation.second_order_prob == 0.5
