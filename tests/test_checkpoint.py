"""Issue 2: checkpoints (safetensors + JSON) and base folders (diffusers `save_pretrained` layout)."""

import dataclasses
import functools
import json
import operator
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from guidesr.checkpoint import (CheckpointError, checkpoint_config, checkpoint_paths, load_checkpoint, save_checkpoint,
                                tensors_sha256)
from guidesr.config import GuidanceConfig, tiny_config
from guidesr.loading import BaseModelError, build_model, load_base_modules, load_model
from guidesr.model import GuideSR


def trained_model(seed: int) -> GuideSR:
    torch.manual_seed(seed)
    model = GuideSR(tiny_config())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny diffusers-format base folder, written the way a user's SD-Turbo folder is laid out."""
    root = tmp_path_factory.mktemp("base")
    config = tiny_config()
    torch.manual_seed(1)
    UNet2DConditionModel(**config.unet).save_pretrained(root / "unet")
    AutoencoderKL(**config.vae).save_pretrained(root / "vae")
    return root


def test_round_trip_is_bit_exact(tmp_path):
    source = trained_model(0)
    json_path = save_checkpoint(source, tmp_path / "ckpt")
    assert json_path == tmp_path / "ckpt.json" and (tmp_path / "ckpt.safetensors").is_file()
    record = json.loads(json_path.read_text())
    assert record["format_version"] == 1 and record["config"]["preset"] == "tiny"
    target = GuideSR(tiny_config())
    digest = load_checkpoint(target, json_path)
    assert digest == record["sha256"] == target.descriptor.checkpoint_sha256
    saved = source.trained_state_dict()
    loaded = target.trained_state_dict()
    assert saved.keys() == loaded.keys() and len(saved) > 50
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


def test_saving_never_writes_through_a_link_planted_at_a_temporary_name(tmp_path):
    """The checkpoint's temporaries are new files (O_EXCL) with random names: links at the names a save once used are
    left alone, and the file they point to is not written."""
    victim = tmp_path / "victim"
    victim.write_text("not the checkpoint's")
    for name in ("ckpt.json.tmp", "ckpt.safetensors.tmp"):
        (tmp_path / name).symlink_to(victim)
    json_path = save_checkpoint(trained_model(0), tmp_path / "ckpt")
    assert victim.read_text() == "not the checkpoint's"
    target = GuideSR(tiny_config())
    assert load_checkpoint(target, json_path) == json.loads(json_path.read_text())["sha256"]


def test_only_trained_parts_are_stored(tmp_path):
    model = trained_model(0)
    save_checkpoint(model, tmp_path / "ckpt")
    from safetensors.torch import load_file

    names = load_file(tmp_path / "ckpt.safetensors").keys()
    assert all(n.startswith(("guidance.", "injections.", "vae_skips.", "prompt.")) or "lora_" in n for n in names)


def test_wrong_preset_fails_naming_both(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    record_path = tmp_path / "ckpt.json"
    record = json.loads(record_path.read_text())
    record["config"]["preset"] = "sd-turbo"
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="preset 'sd-turbo'.*preset 'tiny'"):
        load_checkpoint(GuideSR(tiny_config()), record_path)


def test_other_config_fails_naming_field(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    config = tiny_config()
    config.guidance.channels = 8
    with pytest.raises(CheckpointError, match="guidance"):
        load_checkpoint(GuideSR(config), tmp_path / "ckpt.json")


def test_other_format_version_fails(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    record = json.loads((tmp_path / "ckpt.json").read_text())
    record["format_version"] = 99
    (tmp_path / "ckpt.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt")


@pytest.mark.parametrize("key, value, message", [
    ("tensors", None, "'tensors' must name the safetensors file next to it, got None"),
    ("tensors", "../elsewhere.safetensors", "'tensors' must name the safetensors file next to it"),
    ("config", [], "'config' must be an object of the model's settings, got \\[\\]"),
    ("base_model", 5, "'base_model' must be the base model folder's path or null, got 5"),
])
def test_a_malformed_record_names_the_field(tmp_path, key, value, message):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    record = json.loads((tmp_path / "ckpt.json").read_text())
    record[key] = value
    (tmp_path / "ckpt.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt")


@pytest.mark.parametrize("path, value, message", [
    (("scale",), "four", "GuideSR config field scale must be an integer, got 'four'"),
    (("scale",), 4.0, "GuideSR config field scale must be an integer, got 4.0"),
    (("use_triton_kernels",), 1, "GuideSR config field use_triton_kernels must be true or false, got 1"),
    (("guidance", "channels"), True, "GuideSR config field guidance.channels must be an integer, got True"),
    (("guidance",), [16], "GuideSR config field guidance must be an object, got \\[16\\]"),
    (("lora", "unet_targets"), ["to_q", 3], "GuideSR config field lora.unet_targets must be a list of strings"),
    (("vae",), "tiny", "GuideSR config field vae must be an object, got 'tiny'"),
    (("guidance", "width"), 16, "unknown GuideSR config fields: \\['guidance.width'\\]"),
])
def test_a_config_value_of_the_wrong_type_is_named(tmp_path, path, value, message):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    assert checkpoint_config(tmp_path / "ckpt") == tiny_config()
    _set_config_value(tmp_path / "ckpt.json", path, value)
    with pytest.raises(CheckpointError, match=f"its config cannot be read: {message}"):
        checkpoint_config(tmp_path / "ckpt")


def _set_config_value(json_path, path, value):
    """Rewrite the checkpoint description `json_path` with `value` at `path` (keys) inside its config."""
    record = json.loads(json_path.read_text())
    *parents, key = path
    functools.reduce(operator.getitem, parents, record["config"])[key] = value
    json_path.write_text(json.dumps(record))


def _checkpoint_with(tmp_path, path, value):
    """A tiny-preset checkpoint description whose config holds `value` at `path`."""
    record = {"format": "guidesr-checkpoint", "format_version": 1, "config": tiny_config().to_dict(),
              "tensors": "ckpt.safetensors", "sha256": "", "base_model": None}
    (tmp_path / "ckpt.json").write_text(json.dumps(record))
    _set_config_value(tmp_path / "ckpt.json", path, value)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("path, value, message", [
    (("scale",), 0, "scale must be an integer >= 1, got 0"),
    (("scale",), -4, "scale must be an integer >= 1, got -4"),
    (("timestep",), 5000, "timestep must be an integer from 0 to 999, got 5000"),
    (("timestep",), -1, "timestep must be an integer from 0 to 999, got -1"),
    (("prompt_length",), 0, "prompt_length must be an integer >= 1, got 0"),
    (("guidance", "channels"), -16, "guidance.channels must be an integer >= 1, got -16"),
    (("guidance", "num_frb"), 0, "guidance.num_frb must be an integer >= 1, got 0"),
    (("guidance", "fca_per_frb"), -1, "guidance.fca_per_frb must be an integer >= 0, got -1"),
    (("guidance", "injection_channels"), 0, "guidance.injection_channels must be an integer >= 1, got 0"),
    (("lora", "unet_rank"), -1, "lora.unet_rank must be an integer >= 0, got -1"),
    (("lora", "vae_rank"), -4, "lora.vae_rank must be an integer >= 0, got -4"),
    (("unet", "block_out_channels"), [], "unet.block_out_channels must be a non-empty list of integers >= 1, got []"),
    (("vae", "block_out_channels"), [16, 0, 64, 64],
     "vae.block_out_channels must be a non-empty list of integers >= 1, got [16, 0, 64, 64]"),
    (("vae", "block_out_channels"), [16, 32, 64],
     "vae.block_out_channels must be a list of one entry per vae.down_block_types entry (4), got [16, 32, 64]"),
    (("unet", "cross_attention_dim"), [32, 32], "unet.cross_attention_dim must be an integer >= 1, got [32, 32]"),
    (("unet", "in_channels"), 4, "unet.in_channels must be equal to vae.latent_channels (16), got 4"),
])
def test_a_config_value_out_of_range_is_named(tmp_path, path, value, message):
    with pytest.raises(CheckpointError, match=re.escape(f"its config cannot be read: GuideSR config field {message}")
                       + "$"):
        checkpoint_config(_checkpoint_with(tmp_path, path, value))


def test_a_config_at_the_edges_of_its_ranges_loads_and_runs(tmp_path):
    """scale 1, timestep 0 and 999, FRBs without FCA blocks, no LoRA, 1-channel injections: all build a model."""
    edges = {("scale",): 1, ("timestep",): 999, ("guidance", "fca_per_frb"): 0, ("lora", "unet_rank"): 0,
             ("lora", "vae_rank"): 0, ("guidance", "injection_channels"): 1}
    for path, value in edges.items():
        assert operator.attrgetter(".".join(path))(checkpoint_config(_checkpoint_with(tmp_path, path, value))) == value
    config = dataclasses.replace(tiny_config(), scale=1, timestep=0, use_triton_kernels=False,
                                 guidance=GuidanceConfig(channels=4, num_frb=1, fca_per_frb=0, injection_channels=1),
                                 lora=dataclasses.replace(tiny_config().lora, unet_rank=0, vae_rank=0))
    assert GuideSR(config).upscale(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_a_config_built_in_code_is_range_checked_too():
    with pytest.raises(ValueError, match=r"^GuideSR config field timestep must be an integer from 0 to 999, got 1000$"):
        dataclasses.replace(tiny_config(), timestep=1000)
    with pytest.raises(ValueError, match=r"^GuideSR config field guidance.num_frb must be an integer >= 1, got 0$"):
        dataclasses.replace(tiny_config(), guidance=GuidanceConfig(num_frb=0))


def test_corrupted_tensors_fail_clearly(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    tensors = tmp_path / "ckpt.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt")


def test_truncated_tensors_fail_clearly_even_without_hash_check(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    tensors = tmp_path / "ckpt.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt", verify_hash=False)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "x.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "missing")


def test_a_preset_the_default_model_is_not_says_to_pass_a_checkpoint(tmp_path, base_dir):
    with pytest.raises(CheckpointError, match=r"is for preset 'tiny', not 'sd-turbo' \(the embedded demo model.*"
                                              r"pass a sd-turbo checkpoint \(--checkpoint NAME.json\)"):
        load_model(preset="sd-turbo")
    save_checkpoint(build_model(tiny_config(), base_dir), tmp_path / "own", base_model=str(base_dir))
    with pytest.raises(CheckpointError, match=r"own.json is for preset 'tiny', not 'sd-turbo'$"):
        load_model(tmp_path / "own.json", preset="sd-turbo")


def test_checkpoint_paths():
    assert checkpoint_paths("a/b.safetensors") == checkpoint_paths("a/b") == checkpoint_paths("a/b.json")


def test_another_suffix_is_part_of_the_name(tmp_path):
    assert checkpoint_paths("a/x.png") == (Path("a/x.png.json"), Path("a/x.png.safetensors"))
    assert checkpoint_paths("a/run.v2.json") == (Path("a/run.v2.json"), Path("a/run.v2.safetensors"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint description {tmp_path / 'x.png.json'} does not "
                                                        f"exist (a checkpoint is given as NAME, NAME.json or "
                                                        f"NAME.safetensors)")):
        checkpoint_config(tmp_path / "x.png")


def test_base_folder_loads_through_user_path(base_dir, tmp_path):
    unet, vae = load_base_modules(tiny_config(), base_dir)
    reference = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    for (name, p), (_, q) in zip(unet.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    # the same path a user's SD-Turbo folder takes: checkpoint naming a base folder -> load_model
    source = build_model(tiny_config(), base_dir)
    with torch.no_grad():
        for _, p in source.trainable_parameters():
            p.add_(0.01)
    save_checkpoint(source, tmp_path / "ckpt", base_model=str(base_dir))
    model = load_model(tmp_path / "ckpt.json")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x).r1, source.eval()(x).r1)


def test_missing_subfolder_is_named(base_dir, tmp_path):
    (tmp_path / "unet").symlink_to(base_dir / "unet")
    with pytest.raises(BaseModelError, match="no vae/config.json"):
        load_base_modules(tiny_config(), tmp_path)
    with pytest.raises(BaseModelError, match="does not exist"):
        load_base_modules(tiny_config(), tmp_path / "nowhere")


def test_pickled_base_weights_are_refused(base_dir, tmp_path):
    """A base folder saved as pickles (.bin) is refused, not unpickled: the project loads safetensors only."""
    config = tiny_config()
    UNet2DConditionModel(**config.unet).save_pretrained(tmp_path / "unet", safe_serialization=False)
    (tmp_path / "vae").symlink_to(base_dir / "vae")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(BaseModelError, match=r"cannot load unet weights from .*unet: "
                                             r".*only pickled .bin weights, which guidesr does not load"):
        load_base_modules(config, tmp_path)


def test_wrong_shapes_are_named(tmp_path):
    config = tiny_config()
    wrong = dict(config.unet, block_out_channels=[16, 32])
    UNet2DConditionModel(**wrong).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**config.vae).save_pretrained(tmp_path / "vae")
    with pytest.raises(BaseModelError, match=r"block_out_channels: folder \[16, 32\] vs preset \[32, 64\]"):
        load_base_modules(config, tmp_path)


def test_sd_turbo_checkpoint_without_base_asks_for_it(tmp_path):
    from guidesr.config import sd_turbo_config

    with torch.device("meta"):
        model = GuideSR(sd_turbo_config())
    record = {"format": "guidesr-checkpoint", "format_version": 1, "config": model.config.to_dict(),
              "tensors": "x.safetensors", "sha256": "", "base_model": None}
    (tmp_path / "x.json").write_text(json.dumps(record))
    with pytest.raises(BaseModelError, match="--base-model"):
        load_model(tmp_path / "x.json")


def _rewrite_tensors(tmp_path, change):
    """Replace ckpt.safetensors by `change(tensors)` and record its hash, as a checkpoint written by another
    version of the model would be: a consistent file whose tensors do not fit."""
    from safetensors.torch import load_file, save_file

    from guidesr.checkpoint import file_sha256

    tensors = load_file(tmp_path / "ckpt.safetensors")
    save_file(change(dict(tensors)), tmp_path / "ckpt.safetensors")
    record = json.loads((tmp_path / "ckpt.json").read_text())
    record["sha256"] = file_sha256(tmp_path / "ckpt.safetensors")
    (tmp_path / "ckpt.json").write_text(json.dumps(record))
    return sorted(tensors)


def test_tensors_that_do_not_fit_the_model_are_named(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")

    def drop_one_add_one(tensors):
        tensors.pop(sorted(tensors)[0])
        tensors["guidance.extra.weight"] = torch.zeros(2)
        return tensors

    names = _rewrite_tensors(tmp_path, drop_one_add_one)
    with pytest.raises(CheckpointError, match=rf"1 missing tensor \(e.g. \['{names[0]}'\]\), 1 unexpected "
                                              r"\(e.g. \['guidance.extra.weight'\]\)"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt")

    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    first = _rewrite_tensors(tmp_path, lambda t: t)[0]
    _rewrite_tensors(tmp_path, lambda t: {**t, first: torch.zeros(t[first].numel() + 1)})
    with pytest.raises(CheckpointError, match=rf"tensor {first} has shape \(\d+,\), the model expects"):
        load_checkpoint(GuideSR(tiny_config()), tmp_path / "ckpt")


def test_the_kernel_switch_is_not_part_of_the_compared_config(tmp_path):
    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    config = tiny_config()
    config.use_triton_kernels = not config.use_triton_kernels
    load_checkpoint(GuideSR(config), tmp_path / "ckpt")


def test_without_the_hash_check_the_model_is_keyed_by_the_tensors_it_holds(tmp_path):
    """verify_hash=False loads replaced tensors; the model's sha256 (which keys exported graphs and engines)
    must then be theirs, not the one the JSON records."""
    from guidesr.checkpoint import file_sha256

    save_checkpoint(trained_model(0), tmp_path / "ckpt")
    save_checkpoint(trained_model(1), tmp_path / "other")
    recorded = json.loads((tmp_path / "ckpt.json").read_text())["sha256"]
    (tmp_path / "other.safetensors").replace(tmp_path / "ckpt.safetensors")
    model = GuideSR(tiny_config())
    digest = load_checkpoint(model, tmp_path / "ckpt", verify_hash=False)
    assert digest == file_sha256(tmp_path / "ckpt.safetensors") == model.descriptor.checkpoint_sha256 != recorded


def test_tensors_sha256_tells_dtypes_and_shapes_apart_and_ignores_order_and_layout():
    """The fingerprint of weights and evaluation inputs: the same bytes as another dtype or shape are other tensors; the
    same tensors in another order or memory layout are the same."""
    x, y = torch.arange(6, dtype=torch.int16), torch.ones(3)
    digest = tensors_sha256({"x": x, "y": y})
    assert tensors_sha256({"y": y, "x": x}) == digest
    assert tensors_sha256({"x": x.view(torch.float16), "y": y}) != digest
    assert tensors_sha256({"x": x.view(2, 3), "y": y}) != digest
    assert tensors_sha256({"x": x, "z": y}) != digest
    transposed = x.view(2, 3).t()
    assert tensors_sha256({"x": transposed}) == tensors_sha256({"x": transposed.contiguous()})
