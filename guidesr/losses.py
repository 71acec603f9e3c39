"""GuideSR's training objective (paper §3.3, eqs. 6-8) and the LPIPS network it uses.

    L_B(Y, R)  = w_mse * MSE(R, Y) + w_lpips * LPIPS(R, Y) + w_gan * GAN(R)          (6, 7)
    L_final    = w_diffusion * L_B(Y, R1) + w_guidance * L_B(Y, R2)                     (8)

with R1 the Diffusion Branch output, R2 the Guidance Branch output and Y the HR target,
all in [-1, 1]. GAN(R) = -E[log D(R)] is computed as softplus(-logits), which equals
-log(sigmoid(logits)) without overflowing; the discriminator is trained with the matching
binary cross-entropy. One discriminator (see `guidesr.discriminators`) scores both R1 and
R2, which is what the paper means by the two discriminators sharing weights.

MSE is the mean over pixels *and channels* (`F.mse_loss`); eq. 7 sums the channels, which
only rescales w_mse by 3.

LPIPS (Zhang et al. 2018, VGG variant, v0.1) is re-implemented here rather than imported
from the `lpips` package: that package imports torchvision at module level, and no
torchvision wheel on PyPI loads beside a CPU build of torch 2.13 (its compiled operators
fail to register). The network is the same: LPIPS's input scaling, torchvision's VGG16
`features[:30]` with the same layer indices (so torchvision's checkpoint loads by name),
unit-normalised activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, LPIPS's learned
1x1 linear layers, spatial mean, sum over layers. Nothing is ever downloaded: the VGG16
ImageNet weights come from a file the user names, the linear layers from the copy that the
`lpips` pip package ships (or a file the user names).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's VGG16 `features` layout: conv channel widths, "M" for a 2x2 max-pool.
_VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                        512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: LPIPS's five taps.
_LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
VGG16_CHECKPOINT_NAME = "vgg16-397923af.pth"
VGG16_CHECKPOINT_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


@dataclass(frozen=True)
class LossConfig:
    """Weights of eqs. 6 and 8 (paper values as defaults) and where the LPIPS weights are.

    `lpips_vgg_path`: torchvision's ImageNet VGG16 checkpoint (`vgg16-397923af.pth`, a
    `state_dict` with `features.N.weight` keys; `.safetensors` with the same keys works
    too). Required when `w_lpips > 0`.
    `lpips_linear_path`: LPIPS v0.1 VGG linear layers (`lin0.model.1.weight`, ...); by
    default `weights/v0.1/vgg.pth` inside the installed `lpips` package.
    """

    w_mse: float = 1.0
    w_lpips: float = 5.0
    w_gan: float = 0.5
    w_diffusion: float = 0.9
    w_guidance: float = 0.1
    lpips_vgg_path: str | None = None
    lpips_linear_path: str | None = None


def _lpips_weights_help(problem: str) -> str:
    return (
        f"{problem}. LPIPS (LossConfig.w_lpips > 0) needs two local weight files, and nothing is downloaded: "
        f"(1) set LossConfig.lpips_vgg_path to torchvision's ImageNet VGG16 checkpoint '{VGG16_CHECKPOINT_NAME}' "
        f"({VGG16_CHECKPOINT_URL}; torchvision caches it under ~/.cache/torch/hub/checkpoints/ on a machine with "
        "internet access, copy it here); (2) the LPIPS linear layers 'weights/v0.1/vgg.pth' are taken from the "
        "installed `lpips` package (`pip install --no-deps lpips`) unless LossConfig.lpips_linear_path names that "
        "file. Or set LossConfig.w_lpips = 0 to train without LPIPS."
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or of a PyTorch file through `weights_only` (no arbitrary unpickling)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch.load and safetensors raise many kinds; named here)
        raise ValueError(_lpips_weights_help(f"{path} cannot be read as a weights file ({type(error).__name__}: "
                                             f"{str(error).splitlines()[0] if str(error) else ''})")) from error


def default_lpips_linear_path() -> Path | None:
    """`weights/v0.1/vgg.pth` of the installed `lpips` package, found without importing
    it (importing it needs torchvision), or None if the package is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features[:30]` (up to relu5_3), same module indices."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(item)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk: a frozen perceptual distance, differentiable in its
    inputs. `forward(x, y)` takes images in [-1, 1] and returns one distance per image (B,).
    """

    def __init__(self, vgg_path: str | Path | None, linear_path: str | Path | None = None) -> None:
        super().__init__()
        vgg_file = self._existing(vgg_path, "LossConfig.lpips_vgg_path")
        linear_file = self._existing(linear_path or default_lpips_linear_path(), "LossConfig.lpips_linear_path")
        # LPIPS v0.1 maps [-1, 1] inputs to ImageNet normalisation with these constants.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        # Built without storage (no random init to throw away), then given the loaded tensors.
        with torch.device("meta"):
            self.features = vgg16_features()
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _LPIPS_CHANNELS)

        vgg = _load_state_dict(vgg_file)
        wanted = self.features.state_dict().keys()
        missing = [f"features.{k}" for k in wanted if f"features.{k}" not in vgg]
        if missing:
            raise ValueError(_lpips_weights_help(f"{vgg_file} is not a torchvision VGG16 checkpoint "
                                                 f"(missing {missing[:4]}...)"))
        self.features.load_state_dict({k: vgg[f"features.{k}"] for k in wanted}, assign=True)
        linear = _load_state_dict(linear_file)
        try:
            self.lins.load_state_dict({f"{i}.weight": linear[f"lin{i}.model.1.weight"]
                                       for i in range(len(self.lins))}, assign=True)
        except KeyError as error:
            raise ValueError(_lpips_weights_help(f"{linear_file} has no LPIPS linear layer {error}")) from error
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _existing(path: str | Path | None, option: str) -> Path:
        if path is None:
            raise ValueError(_lpips_weights_help(f"{option} is not set"))
        if not Path(path).is_file():
            raise FileNotFoundError(_lpips_weights_help(f"{option} = {path} does not exist"))
        return Path(path)

    def train(self, mode: bool = True) -> LPIPS:
        """LPIPS stays in eval mode: it is a fixed metric, never trained."""
        return super().train(False)

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in _LPIPS_TAPS:
                taps.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        distance = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            distance = distance + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return distance


def generator_gan_loss(logits: torch.Tensor) -> torch.Tensor:
    """-E[log D(R)] = mean softplus(-logits): the non-saturating generator loss."""
    return F.softplus(-logits).mean()


def discriminator_gan_loss(real_logits: torch.Tensor, fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Binary cross-entropy: real images towards 1, each kind of fake towards 0, the fakes
    (R1 and R2) averaged so they count as much together as the real images do."""
    fake = torch.stack([F.softplus(logits).mean() for logits in fake_logits]).mean()
    return F.softplus(-real_logits).mean() + fake


class GuideSRLoss(nn.Module):
    """Eq. 8 for the generator step; `discriminator_loss` for the discriminator step.

    The discriminator is passed in, not owned: the trainer holds it with its optimizer
    and calls it here on R1 and on R2 (one module, shared weights). During the generator
    step its parameters receive gradients as well; the trainer zeroes (or freezes) them
    before the discriminator step.
    """

    def __init__(self, config: LossConfig = LossConfig()) -> None:
        super().__init__()
        self.config = config
        self.lpips = LPIPS(config.lpips_vgg_path, config.lpips_linear_path) if config.w_lpips > 0 else None

    def branch_loss(
        self, restored: torch.Tensor, target: torch.Tensor, discriminator: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        """Eq. 6 for one branch: its weighted total under "total" and each unweighted term."""
        c = self.config
        terms = {"mse": F.mse_loss(restored, target)}
        total = c.w_mse * terms["mse"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(restored, target).mean()
            total = total + c.w_lpips * terms["lpips"]
        if c.w_gan > 0:
            if discriminator is None:
                raise ValueError("LossConfig.w_gan > 0 needs the discriminator")
            terms["gan"] = generator_gan_loss(discriminator(restored))
            total = total + c.w_gan * terms["gan"]
        terms["total"] = total
        return terms

    def forward(
        self, r1: torch.Tensor, r2: torch.Tensor, target: torch.Tensor, discriminator: nn.Module | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns L_final and every term, detached, prefixed `r1/` (Diffusion Branch) and
        `r2/` (Guidance Branch); tensors, so that logging syncs with the GPU only when it
        reads them."""
        diffusion = self.branch_loss(r1, target, discriminator)
        guidance = self.branch_loss(r2, target, discriminator)
        total = self.config.w_diffusion * diffusion["total"] + self.config.w_guidance * guidance["total"]
        log = {f"r1/{k}": v.detach() for k, v in diffusion.items()}
        log |= {f"r2/{k}": v.detach() for k, v in guidance.items()}
        log["total"] = total.detach()
        return total, log


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, r1: torch.Tensor,
                       r2: torch.Tensor) -> torch.Tensor:
    """The discriminator step: HR images are real, both branches' outputs fake. The fakes
    are detached, so this trains only the discriminator. All three are scored in one
    batched call (the discriminators have no batch statistics, so this equals three)."""
    logits = discriminator(torch.cat([real, r1.detach(), r2.detach()])).chunk(3)
    return discriminator_gan_loss(logits[0], [logits[1], logits[2]])
