"""Issue 2: the GuideSR model (tiny preset on CPU, sd-turbo shapes on the meta device)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guidesr.config import preset_config, sd_turbo_config, tiny_config
from guidesr.diffusion import vae_encode
from guidesr.guidance import GuidanceBranch
from guidesr.injection import build_injections
from guidesr.model import GuideSR, pad_to_multiple, set_kernels_enabled
from helpers import randomize_trainable
from runtime.tiling import BicubicSource


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GuideSR(tiny_config()).eval()


@pytest.mark.parametrize("size", [(72, 56), (128, 128), (200, 136)])
def test_forward_odd_sizes_shape_finite_deterministic(tiny, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        first = tiny(x)
        second = tiny(x)
    for out in (first.r1, first.r2):
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        assert out.abs().max() <= 1.0
    assert torch.equal(first.r1, second.r1) and torch.equal(first.r2, second.r2)


def test_same_seed_builds_identical_model():
    torch.manual_seed(3)
    a = GuideSR(tiny_config())
    torch.manual_seed(3)
    b = GuideSR(tiny_config())
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_zero_init_equals_plain_diffusion_pipeline(tiny):
    """Untrained injection and VAE skips: R1 == decode(UNet(encode(x), t_f) + encode(x)), diffusers' own forwards."""
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    vae, unet, cfg = tiny.vae, tiny.unet, tiny.config
    with torch.no_grad():
        r1 = tiny(x).r1
        padded = pad_to_multiple(x, cfg.size_multiple)
        latent = vae.encode(padded).latent_dist.mean * vae.config.scaling_factor
        text = tiny.prompt(padded)
        residual = unet(latent, cfg.timestep, encoder_hidden_states=text).sample
        plain = vae.decode((latent + residual) / vae.config.scaling_factor).sample
        plain = plain[..., : x.shape[-2], : x.shape[-1]].clamp(-1, 1)
    assert (r1 - plain).abs().max().item() <= 1e-6


def test_injection_and_skips_change_output_once_trained():
    torch.manual_seed(0)
    model = GuideSR(tiny_config()).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = model(x).r1
        randomize_trainable(model, 5)
        after = model(x).r1
    assert (before - after).abs().max() > 1e-3


def test_gradients_reach_only_trainable_parts():
    torch.manual_seed(0)
    model = GuideSR(tiny_config())
    randomize_trainable(model, 7)  # with LoRA B = 0, LoRA A would get no gradient
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    out = model(x)
    (out.r1.square().mean() + out.r2.square().mean()).backward()
    trainable_prefixes = ("guidance.", "injections.", "vae_skips.", "prompt.")
    for name, p in model.named_parameters():
        is_trainable = name.startswith(trainable_prefixes) or "lora_" in name
        assert p.requires_grad == is_trainable, name
        if is_trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"base weight {name} got a gradient"
    groups = {n.split(".")[0] for n, _ in model.trainable_parameters()}
    assert groups == {"guidance", "injections", "vae_skips", "prompt", "unet", "vae"}
    assert any("lora_" in n and n.startswith("unet.") for n, _ in model.trainable_parameters())
    assert any("lora_" in n and n.startswith("vae.") for n, _ in model.trainable_parameters())


def test_lora_ranks_follow_config(tiny):
    ranks = {}
    for name, p in tiny.named_parameters():
        if "lora_A" in name:
            ranks.setdefault(name.split(".")[0], set()).add(p.shape[0])
    assert ranks == {"unet": {8}, "vae": {4}}


def test_merge_lora_keeps_output():
    """Merging is exact algebra (fp64), and in fp32 costs no more than the model's own fp32 rounding."""
    torch.manual_seed(0)
    model = GuideSR(tiny_config()).eval()
    randomize_trainable(model, 11, only_lora=True)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        exact = copy.deepcopy(model).double()
        unmerged64 = exact(x.double()).r1
        exact.merge_lora()
        assert (exact(x.double()).r1 - unmerged64).abs().max().item() <= 1e-10
        before = model(x).r1
        model.merge_lora()
        after = model(x).r1
    assert not any("lora_" in n for n, _ in model.named_parameters()) and model.lora_merged
    fp32_rounding = (before.double() - unmerged64).abs().max().item()
    assert (before - after).abs().max().item() <= max(1e-5, 2 * fp32_rounding)


def test_sd_turbo_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = GuideSR(sd_turbo_config())
    base = lambda module: sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)  # noqa: E731
    unet, vae = base(model.unet), base(model.vae)
    assert round(unet / 1e6, 1) == 865.9
    assert round(vae / 1e6, 1) == 83.7
    injection = sum(p.numel() for p in model.injections.parameters())
    assert injection <= 0.10 * unet
    assert model.config.size_multiple == 64 and model.config.injection_scales == [8, 16, 32, 64]


def test_upscale_runs_the_model_on_the_runtimes_bicubic_upsample(tiny):
    """GuideSR.upscale (the Python API) and runtime.upscale's tiles (BicubicSource) feed the model the same
    bicubic x4 upsample, clamped to [-1, 1]."""
    low_res = torch.rand(1, 3, 5, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    upsampled = BicubicSource(low_res[0], tiny.config.scale)(0, 0, 20, 16)
    with torch.no_grad():
        expected = tiny(upsampled[None]).r1
    assert torch.equal(tiny.upscale(low_res), expected)


def test_set_kernels_enabled_switches_every_kernel_call_site():
    """report's and stage_timing's --triton-kernels on/off: every FCA block and injection follows the switch."""
    model = nn.ModuleList([GuidanceBranch(4, num_frb=1, fca_per_frb=2), build_injections(8, [4, 6], [2, 4], 8)])
    switches = [m for m in model.modules() if hasattr(m, "use_kernel")]
    assert len(switches) == 4 and all(m.use_kernel for m in switches)
    set_kernels_enabled(model, False)
    assert not any(m.use_kernel for m in switches)
    set_kernels_enabled(model, True)
    assert all(m.use_kernel for m in switches)


def test_pad_to_multiple_reflects_and_replicates():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    padded = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflect
    tiny_image = torch.rand(1, 3, 3, 3)
    assert pad_to_multiple(tiny_image, 16).shape[-2:] == (16, 16)  # too small to reflect: replicate


def test_pad_to_multiple_replicates_where_the_pad_equals_the_size():
    """Reflect needs pad < size: an image exactly half the multiple along an axis is replicate-padded."""
    x = torch.rand(2, 3, 8, 24, generator=torch.Generator().manual_seed(4))
    padded = pad_to_multiple(x, 16)  # pad 8 rows to 8 rows: replicate
    assert torch.equal(padded, F.pad(x, (0, 8, 0, 8), mode="replicate"))


def guidance_reference(branch: GuidanceBranch, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper §3.1 written out with F.conv2d on the branch's weights: FCA x + conv2(g * sigmoid(W mean(g) + b)),
    g = GELU(conv1(x)); FRB skip(x) + tail(FCA...(x));
    IGN F_r = F_d + V(F_d) * sigmoid(A(C(F_d) + I)), R2 = O(F_r) + I."""
    def conv(module: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, module.weight, module.bias, stride=module.stride, padding=module.padding)

    features = conv(branch.head, image)
    for frb in branch.frgnet:
        inner = features
        for block in frb.blocks:
            g = F.gelu(conv(block.conv1, inner))
            gate = torch.sigmoid(conv(block.attention, g.mean(dim=(2, 3), keepdim=True)))
            inner = inner + conv(block.conv2, g * gate)
        skip = features if isinstance(frb.skip, nn.Identity) else conv(frb.skip, features)
        features = skip + conv(frb.tail, inner)
    ign = branch.ign
    attention = torch.sigmoid(conv(ign.to_attention, conv(ign.to_coarse_image, features) + image))
    refined = features + conv(ign.value, features) * attention
    return refined, conv(ign.to_image, refined) + image


def test_guidance_branch_computes_the_papers_equations():
    """The Guidance Branch's forward (FCA, FRB, IGN residuals and gates) against the equations, in float64: the
    other tests see it only through zero-initialised injections or through itself."""
    torch.manual_seed(8)
    branch = GuidanceBranch(6, num_frb=2, fca_per_frb=2, use_kernel=False).double().eval()
    image = torch.rand(2, 3, 11, 17, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        refined, residual = branch(image)
        expected_refined, expected_residual = guidance_reference(branch, image)
    assert refined.shape == (2, 12, 11, 17) and residual.shape == image.shape
    torch.testing.assert_close(refined, expected_refined, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(residual, expected_residual, rtol=1e-12, atol=1e-12)


def test_vae_encode_returns_skip_per_down_block(tiny):
    latent, skips = vae_encode(tiny.vae, torch.zeros(1, 3, 64, 32))
    assert latent.shape == (1, 16, 8, 4)
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4]


def test_preset_lookup():
    assert preset_config("tiny").preset == "tiny"
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")


def test_descriptor(tiny):
    d = tiny.descriptor
    assert (d.scale, d.size_multiple, d.preset) == (4, 16, "tiny")
    assert d.input_range == (-1.0, 1.0)


def injected(injection, hidden: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Paper eq. 3 written out: h + P(cat(h, PixelUnshuffle(narrow(F_r), s)))."""
    narrowed = guidance if isinstance(injection.narrow, nn.Identity) else F.conv2d(
        guidance, injection.narrow.weight, injection.narrow.bias)
    joined = torch.cat([hidden, F.pixel_unshuffle(narrowed, injection.scale)], dim=1)
    return hidden + F.conv2d(joined, injection.project.weight, injection.project.bias)


def test_trained_forward_equals_diffusers_forwards_with_injections_and_skips():
    """R1 = Dec(F_m + F_l) at t_f through diffusers' own forwards, with hooks adding eq. 3 at every UNet down-block
    input (also its skip) and zero-conv(encoder down-block input) at the mirrored decoder up-block input (float64)."""
    torch.manual_seed(0)
    model = randomize_trainable(GuideSR(tiny_config()), 3).double().eval()
    vae, unet, cfg = model.vae, model.unet, model.config
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    encoder_inputs, hooks = [], []
    with torch.no_grad():
        guidance, _ = model.guidance(x)
        first, later = model.injections[0], model.injections[1:]
        hooks.append(unet.conv_in.register_forward_hook(lambda m, a, out: injected(first, out, guidance)))
        for block, injection in zip(unet.down_blocks, later):
            def inject_after(m, a, out, injection=injection):
                h = injected(injection, out[0], guidance)
                return h, (*out[1][:-1], h)
            hooks.append(block.register_forward_hook(inject_after))
        hooks += [block.register_forward_pre_hook(lambda m, a: encoder_inputs.append(a[0]))
                  for block in vae.encoder.down_blocks]
        for block, conv, skip_index in zip(vae.decoder.up_blocks, model.vae_skips.convs, range(3, -1, -1)):
            hooks.append(block.register_forward_pre_hook(lambda m, a, conv=conv, i=skip_index: (
                a[0] + F.conv2d(encoder_inputs[i], conv.weight, conv.bias), *a[1:])))
        try:
            latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            residual = unet(latent, cfg.timestep, encoder_hidden_states=model.prompt(x)).sample
            expected = vae.decode((latent + residual) / vae.config.scaling_factor).sample.clamp(-1, 1)
        finally:
            for hook in hooks:
                hook.remove()
        r1 = model(x).r1
    assert len(encoder_inputs) == 4 and all(c.weight.abs().max() > 0 for c in model.vae_skips.convs)
    torch.testing.assert_close(r1, expected, rtol=0, atol=1e-10)


def test_injection_widths_follow_the_unet_and_the_unshuffle_budget():
    """Each F'_r is injection_channels wide (c_s = injection_channels / s^2, at most 2C, at least 1); no narrowing
    conv where c_s = 2C (sd-turbo's first scale); P maps [h, F'_r] back to the width of its down block's input."""
    with torch.device("meta"):
        model = GuideSR(sd_turbo_config())
    inputs = [block.resnets[0].in_channels for block in model.unet.down_blocks]
    assert inputs == [320, 320, 640, 1280]
    widths = [(m.scale, getattr(m.narrow, "out_channels", None), m.project.in_channels, m.project.out_channels)
              for m in model.injections]
    assert widths == [(8, None, 320 + 4096, 320), (16, 16, 320 + 4096, 320), (32, 4, 640 + 4096, 640),
                      (64, 1, 1280 + 4096, 1280)]
    assert isinstance(model.injections[0].narrow, nn.Identity)
    small = build_injections(8, [4, 6], [2, 4], injection_channels=8)
    assert [(m.narrow.out_channels, m.project.in_channels) for m in small] == [(2, 4 + 2 * 4), (1, 4 + 16)]
    wide = build_injections(2, [4], [2], injection_channels=16)[0]  # budget 16 / 2^2 = 4 > 2C = 2: no widening
    assert isinstance(wide.narrow, nn.Identity) and wide.project.in_channels == 4 + 2 * 4
