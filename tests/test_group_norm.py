"""runtime.backends.group_norm: ChannelStatsGroupNorm is nn.GroupNorm, in float64 and within each dtype's own error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.backends.group_norm import ChannelStatsGroupNorm, use_channel_stats_group_norm
from tests.helpers import randomized_tiny


def make_norm(groups: int, channels: int, affine: bool, dtype: torch.dtype, seed: int = 0) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=affine).to(dtype)
    if affine:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator))
            norm.bias.copy_(torch.randn(channels, generator=generator))
    return norm


def sample(shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, channels_last: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# odd shapes: 3 channels per group, non-square, batch 3; a 3-D input; a single group
SHAPES = [((3, 12, 7, 10), 4), ((2, 8, 9, 5), 8), ((3, 6, 11), 3), ((1, 5, 6, 6), 1)]


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_group_norm_in_float64(shape, groups, affine, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    norm = make_norm(groups, shape[1], affine, torch.float64)
    x = sample(shape, mean=3.0, std=2.0, channels_last=channels_last)
    torch.testing.assert_close(ChannelStatsGroupNorm(norm)(x), norm(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mean", [0.0, 50.0])
def test_error_is_within_twice_pytorchs_own(dtype, mean):
    """Against float64: at most twice the error of nn.GroupNorm in the same dtype, plus a small atol.
    Mean 50 with std 10 is the case where fp16 statistics would overflow (sum of squares >> 65504)."""
    shape, groups = (3, 12, 17, 23), 4
    norm64 = make_norm(groups, shape[1], True, torch.float64)
    norm = make_norm(groups, shape[1], True, dtype)
    x64 = sample(shape, mean=mean, std=10.0, channels_last=True)
    x = x64.to(dtype)
    expected = norm64(x.double())  # the input's own rounding is not the op's error
    ours = (ChannelStatsGroupNorm(norm)(x).double() - expected).abs().max().item()
    theirs = (norm.float()(x.float()).to(dtype).double() - expected).abs().max().item()
    atol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert ChannelStatsGroupNorm(norm)(x).dtype == dtype
    assert ours <= 2 * theirs + atol


def test_swap_replaces_every_group_norm_and_keeps_the_model_output():
    model = randomized_tiny(seed=2).double().eval()
    expected_count = sum(type(m) is nn.GroupNorm for m in model.modules())
    x = sample((2, 3, 64, 48)).clamp(-1, 1)
    with torch.no_grad():
        before = model(x).r1
        assert use_channel_stats_group_norm(model) == expected_count > 0
        after = model(x).r1
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)


def test_parameters_are_shared_not_copied():
    norm = make_norm(2, 4, True, torch.float32)
    swapped = ChannelStatsGroupNorm(norm)
    assert swapped.weight is norm.weight and swapped.bias is norm.bias
    assert "2, 4, eps=1e-06, affine=True" in repr(swapped)


def test_inductor_compiles_it_to_the_same_values():
    norm = make_norm(4, 12, True, torch.float32)
    x = sample((2, 12, 9, 14), mean=1.0, channels_last=True).float()
    module = ChannelStatsGroupNorm(norm)
    compiled = torch.compile(lambda t: F.silu(module(t)), dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.silu(norm(x)), rtol=1e-5, atol=1e-5)
