"""GuideSR's loss (eqs. 6-8), the LPIPS network and its weight loading, and the shared
discriminators (convolutional, and CLIP-backbone on a tiny CLIP saved to disk)."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from guidesr.discriminators import CLIPDiscriminator, DiscriminatorConfig, PatchDiscriminator, build_discriminator
from guidesr.losses import (
    LPIPS,
    vgg16_features,
    GuideSRLoss,
    LossConfig,
    default_lpips_linear_path,
    discriminator_gan_loss,
    discriminator_loss,
    generator_gan_loss,
)
from helpers import tiny_clip_vision_config

# torchvision's vgg16() `features` convolutions: index -> (out, in) channels. Written out
# here independently of guidesr.losses so the test checks the layout, not a copy of it.
TORCHVISION_VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A torchvision-format VGG16 checkpoint and an LPIPS linear-layer file, both with
    random (He-initialised, fixed-seed) weights: real formats, made-up values."""
    folder = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for index, (out, inp) in TORCHVISION_VGG16_CONVS.items():
        vgg[f"features.{index}.weight"] = torch.randn(out, inp, 3, 3, generator=g) * math.sqrt(2 / (inp * 9))
        vgg[f"features.{index}.bias"] = torch.zeros(out)
    vgg["classifier.6.weight"] = torch.zeros(10, 4)  # the real file has a classifier too; it is ignored
    torch.save(vgg, folder / "vgg16-397923af.pth")
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
              for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(linear, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g), size=(size, size), mode="bicubic")
    return (smooth * 2 - 1).clamp(-1, 1)


def test_paper_weights_are_the_defaults():
    c = LossConfig()
    assert (c.w_mse, c.w_lpips, c.w_gan, c.w_diffusion, c.w_guidance) == (1.0, 5.0, 0.5, 0.9, 0.1)


def test_lpips_without_weights_fails_at_construction_saying_how_to_provide_them(tmp_path):
    with pytest.raises(ValueError) as error:
        GuideSRLoss(LossConfig())
    message = str(error.value)
    for needed in ("LossConfig.lpips_vgg_path", "vgg16-397923af.pth", "weights/v0.1/vgg.pth", "w_lpips = 0"):
        assert needed in message
    with pytest.raises(FileNotFoundError, match="lpips_vgg_path = .*missing.pth does not exist"):
        GuideSRLoss(LossConfig(lpips_vgg_path=str(tmp_path / "missing.pth")))


def test_lpips_refuses_a_file_that_is_not_vgg16(lpips_files):
    vgg, linear = lpips_files
    with pytest.raises(ValueError, match="not a torchvision VGG16 checkpoint"):
        LPIPS(linear, linear)
    with pytest.raises(ValueError, match="no LPIPS linear layer"):
        LPIPS(vgg, vgg)


def test_lpips_names_a_weights_file_it_cannot_read(lpips_files, tmp_path):
    _, linear = lpips_files
    for name in ("corrupt.pth", "corrupt.safetensors"):
        (tmp_path / name).write_bytes(b"not a weights file")
        with pytest.raises(ValueError, match=f"{name} cannot be read as a weights file"):
            LPIPS(tmp_path / name, linear)


def test_lpips_is_a_frozen_differentiable_distance(lpips_files):
    vgg, linear = lpips_files
    lpips = LPIPS(vgg, linear)
    state = torch.load(vgg, weights_only=True)
    assert torch.equal(lpips.features[28].weight, state["features.28.weight"])  # loaded by torchvision's names
    lpips.train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())

    x = images(0)
    g = torch.Generator().manual_seed(1)
    slightly = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    strongly = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    near, far = lpips(x, slightly), lpips(x, strongly)
    assert near.shape == (2,) and (near > 0).all() and (far > near).all()

    y = slightly.clone().requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.skipif(default_lpips_linear_path() is None,
                    reason="the lpips package (source of the LPIPS linear weights) is not installed")
def test_lpips_reads_the_linear_layers_shipped_with_the_lpips_package(lpips_files):
    vgg, _ = lpips_files
    shipped = torch.load(default_lpips_linear_path(), map_location="cpu", weights_only=True)
    lpips = LPIPS(vgg)
    for i, lin in enumerate(lpips.lins):
        assert torch.equal(lin.weight, shipped[f"lin{i}.model.1.weight"])


@pytest.mark.skipif(default_lpips_linear_path() is None, reason="the lpips package is not installed")
def test_lpips_computes_what_the_lpips_package_computes(lpips_files, monkeypatch):
    """Reference check against lpips.LPIPS(net="vgg") itself. The package imports
    torchvision only to build `vgg16().features`, and torchvision cannot be installed
    beside torch's CPU build, so a stand-in `torchvision.models.vgg16` supplies that layer
    stack (its layout is checked against torchvision's above); everything LPIPS computes on
    top (input scaling, taps, normalisation, linear layers, averaging) is the package's."""

    class VGG16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(*vgg16_features(), torch.nn.MaxPool2d(2, 2))

    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda pretrained=False: VGG16()
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    before = set(sys.modules)
    try:
        import lpips

        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # shipped linear layers
    finally:  # the stand-in-backed import must not outlive this test
        for name in set(sys.modules) - before:
            del sys.modules[name]
    vgg, _ = lpips_files
    vgg_state = torch.load(vgg, weights_only=True)
    # The package splits `features` into slice1..slice5 keeping torchvision's indices.
    reference.net.load_state_dict({key: vgg_state[f"features.{key.split('.', 1)[1]}"]
                                   for key in reference.net.state_dict()})

    ours = LPIPS(vgg)
    x = images(0, n=3)
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-7)


def test_gan_terms_are_the_stable_forms_of_the_log_losses():
    logits = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(generator_gan_loss(logits), -torch.log(torch.sigmoid(logits)).mean())
    real, fake = torch.tensor([1.0, -0.5]), torch.tensor([0.3, -2.0])
    expected = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(discriminator_gan_loss(real, [fake, fake]), expected)
    assert torch.isfinite(generator_gan_loss(torch.tensor([-200.0])))  # log(sigmoid) would give inf


def test_final_loss_is_eq8_and_one_discriminator_scores_both_branches(lpips_files):
    vgg, linear = lpips_files
    loss = GuideSRLoss(LossConfig(lpips_vgg_path=str(vgg), lpips_linear_path=str(linear)))
    disc = PatchDiscriminator(channels=16)
    scored = []
    disc.register_forward_hook(lambda module, args, out: scored.append(args[0]))

    hr = images(0)
    r1 = images(1).requires_grad_(True)
    r2 = images(2).requires_grad_(True)
    total, log = loss(r1, r2, hr, disc)
    assert [t is r1 for t in scored] == [True, False] and scored[1] is r2  # same module, R1 then R2

    for branch in ("r1", "r2"):
        terms = {k: log[f"{branch}/{k}"] for k in ("mse", "lpips", "gan")}
        assert all(torch.isfinite(v) and v > 0 for v in terms.values())
        torch.testing.assert_close(log[f"{branch}/total"], terms["mse"] + 5.0 * terms["lpips"] + 0.5 * terms["gan"])
    torch.testing.assert_close(total.detach(), 0.9 * log["r1/total"] + 0.1 * log["r2/total"])

    total.backward()
    assert r1.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0  # the generated images get gradients
    disc.zero_grad()
    d_loss = discriminator_loss(disc, hr, r1, r2)
    r1.grad = None
    d_loss.backward()
    assert torch.isfinite(d_loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert r1.grad is None  # fakes are detached in the discriminator step


def test_gan_needs_a_discriminator_and_lpips_can_be_switched_off():
    loss = GuideSRLoss(LossConfig(w_lpips=0.0))
    assert loss.lpips is None
    with pytest.raises(ValueError, match="needs the discriminator"):
        loss(images(1), images(2), images(0), None)
    total, log = GuideSRLoss(LossConfig(w_lpips=0.0, w_gan=0.0))(images(1), images(2), images(0), None)
    torch.testing.assert_close(total, 0.9 * F.mse_loss(images(1), images(0)) + 0.1 * F.mse_loss(images(2), images(0)))
    assert "r1/gan" not in log and "r1/lpips" not in log


def test_clip_discriminator_freezes_the_backbone_and_trains_the_heads(tmp_path):
    torch.manual_seed(0)
    saved = CLIPVisionModel(tiny_clip_vision_config())
    saved.save_pretrained(tmp_path / "clip")
    disc = build_discriminator(DiscriminatorConfig(kind="clip", clip_path=str(tmp_path / "clip"), head_channels=16))
    assert isinstance(disc, CLIPDiscriminator) and disc.layers == (1, 2)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(disc.backbone.state_dict()[name], value)  # weights read from disk
    disc.train()
    assert disc.heads.training and not disc.backbone.training

    fake = images(1, size=64).requires_grad_(True)
    logits = disc(fake)
    assert logits.shape == (2, 2 * (16 + 1))  # two layers x (16 patches + class token)
    generator_gan_loss(logits).backward()
    assert fake.grad.abs().sum() > 0  # through the frozen backbone to the generated image
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())

    # The discriminator that scores R1 and R2 inside the full loss.
    r1, r2 = images(2, size=64).requires_grad_(True), images(3, size=64).requires_grad_(True)
    total, log = GuideSRLoss(LossConfig(w_lpips=0.0))(r1, r2, images(0, size=64), disc)
    total.backward()
    assert torch.isfinite(log["r1/gan"]) and r1.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0


def test_clip_discriminator_accepts_a_full_clip_model_folder(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 100}
    config = CLIPConfig(text_config=text, vision_config=tiny_clip_vision_config().to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    disc = CLIPDiscriminator(tmp_path / "clip", layers=(2,), head_channels=8)
    assert disc(images(0, size=32)).shape == (2, 17)


def test_discriminator_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="needs clip_path"):
        build_discriminator(DiscriminatorConfig(kind="clip"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_discriminator(DiscriminatorConfig(kind="clip", clip_path=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="unknown discriminator kind"):
        build_discriminator(DiscriminatorConfig(kind="stylegan"))
    patch = build_discriminator(DiscriminatorConfig(kind="patch", patch_channels=8))
    assert patch(images(0, size=64)).shape == (2, 6 * 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 patch logits


def test_every_weight_of_eq6_is_applied():
    disc = PatchDiscriminator(channels=8).eval()  # eval: spectral norm does no power iteration per call
    hr, r1, r2 = images(0), images(1), images(2)
    total, log = GuideSRLoss(LossConfig(w_mse=2.5, w_lpips=0.0, w_gan=0.3, w_diffusion=0.7,
                                        w_guidance=0.2))(r1, r2, hr, disc)
    for branch, restored in (("r1", r1), ("r2", r2)):
        mse, gan = F.mse_loss(restored, hr), F.softplus(-disc(restored)).mean()
        torch.testing.assert_close(log[f"{branch}/mse"], mse)
        torch.testing.assert_close(log[f"{branch}/total"], 2.5 * mse + 0.3 * gan)
    torch.testing.assert_close(total, 0.7 * log["r1/total"] + 0.2 * log["r2/total"])


def test_the_discriminator_step_scores_hr_as_real_and_both_branches_as_fake():
    disc = PatchDiscriminator(channels=8).eval()  # eval: spectral norm does no power iteration per call
    hr, r1, r2 = images(0), images(1), images(2)
    with torch.no_grad():
        real, fake1, fake2 = disc(hr), disc(r1), disc(r2)
        expected = F.softplus(-real).mean() + 0.5 * (F.softplus(fake1).mean() + F.softplus(fake2).mean())
        torch.testing.assert_close(discriminator_loss(disc, hr, r1, r2), expected)
        torch.testing.assert_close(discriminator_gan_loss(real, [fake1, fake2]), expected)


def test_the_gan_term_trains_both_branches_through_the_discriminator():
    """GAN(R) = -E[log D(R)] reaches R1 and R2 through D: with the other terms off, each branch's gradient is that of
    its eq. 8 weight x w_gan x -mean(log sigmoid(D(R)))."""
    disc = PatchDiscriminator(channels=8).eval()  # eval: spectral norm does no power iteration per call
    r1, r2 = images(1).requires_grad_(True), images(2).requires_grad_(True)
    total, _ = GuideSRLoss(LossConfig(w_mse=0.0, w_lpips=0.0))(r1, r2, images(0), disc)
    total.backward()
    for restored, weight in ((r1, 0.9 * 0.5), (r2, 0.1 * 0.5)):
        reference = restored.detach().clone().requires_grad_(True)
        (weight * -torch.log(torch.sigmoid(disc(reference))).mean()).backward()
        assert reference.grad.abs().sum() > 0
        torch.testing.assert_close(restored.grad, reference.grad)
