"""runtime/backends/small_conv.py: im2col convolutions and the measured per-layer choice (float64 on the CPU)."""

import pytest
import torch
from torch import nn

from runtime.backends.small_conv import Im2ColConv2d, eligible, use_im2col_where_faster


@pytest.mark.parametrize("kernel, bias", [(3, True), (3, False), (1, True), (5, True)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_im2col_is_the_same_convolution(kernel, bias, batch, channels_last):
    torch.manual_seed(kernel + batch)
    conv = nn.Conv2d(5, 7, kernel, padding=kernel // 2, bias=bias).double()
    x = torch.randn(batch, 5, 6, 9, dtype=torch.float64)  # non-square, odd sizes
    if channels_last:  # as the compiled backend's model runs: activations and weights channels_last
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, actual = conv(x), Im2ColConv2d(conv)(x)
    assert actual.shape == expected.shape
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert (actual - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 4, 3, stride=2, padding=1),
    nn.Conv2d(4, 4, 3, padding=1, dilation=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=0),
    nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
])
def test_what_im2col_does_not_reproduce_is_refused(conv):
    assert not eligible(conv)
    with pytest.raises(ValueError, match="Im2ColConv2d takes"):
        Im2ColConv2d(conv)


def test_eligibility_by_output_pixels():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert eligible(conv, 256, torch.Size([1, 4, 16, 16]))
    assert not eligible(conv, 256, torch.Size([1, 4, 16, 17]))


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).double()


@pytest.mark.parametrize("min_gain, swapped", [(float("inf"), {"0", "3", "4"}), (0.0, set())])
def test_swaps_follow_the_timing_rule_and_keep_the_function(min_gain, swapped):
    """min_gain = inf: every eligible layer counts as faster; 0: none does (the rule, not the clock, is tested)."""
    net = small_net()
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
    rows = use_im2col_where_faster(net, lambda: net(x), max_pixels=10 * 12, min_gain=min_gain, repeats=2)
    assert {row["layer"] for row in rows} == {"0", "3", "4"}  # the stride-2 layer is not eligible
    assert {row["layer"] for row in rows if row["swapped"]} == swapped
    assert {name for name, m in net.named_children() if isinstance(m, Im2ColConv2d)} == swapped
    assert all(row["conv_ms"] > 0 and row["im2col_ms"] > 0 for row in rows)
    with torch.no_grad():
        assert (net(x) - expected).abs().max().item() < 1e-12


def test_only_small_layers_are_timed():
    net = small_net()
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    rows = use_im2col_where_faster(net, lambda: net(x), max_pixels=5 * 6, min_gain=float("inf"), repeats=1)
    assert {row["layer"] for row in rows} == {"3", "4"}  # layer 0 sees 10x12 = 120 pixels; 3 and 4 see 5x6
