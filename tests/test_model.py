"""The network's shape, size and its CPU dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model
from model import Net

SIZES = [26, 24, 12, 12, 12, 10, 5, 5, 3, 1]
RECEPTIVE_FIELDS = [3, 5, 6, 6, 10, 14, 16, 16, 24, 32]
JUMPS = [1, 1, 2, 2, 2, 2, 4, 4, 4, 4]
STAGES = ["conv1", "conv2", "pool1", "trans1", "conv3", "conv4", "pool2", "trans2", "conv5",
          "conv6"]


@pytest.fixture(scope="module")
def table() -> list[model.LayerInfo]:
    torch.manual_seed(0)
    return model.layer_table(Net())


def test_layer_names_follow_the_write_up(table):
    assert [r.name for r in table] == STAGES


def test_output_sizes(table):
    assert [r.out_size for r in table] == SIZES


def test_receptive_fields_and_jumps(table):
    assert [r.receptive_field for r in table] == RECEPTIVE_FIELDS
    assert [r.jump for r in table] == JUMPS
    # The last conv sees the whole 28x28 digit.
    assert table[-1].receptive_field >= 28


def test_output_channels_follow_the_channel_plan(table):
    convs = [r.out_channels for r in table if r.kind != "maxpool"]
    assert tuple(convs) == model.CHANNELS


def test_layer_table_leaves_the_training_mode_alone():
    net = Net()
    net.train()
    model.layer_table(net)
    assert net.training
    net.eval()
    model.layer_table(net)
    assert not net.training


def test_parameter_count():
    n = model.count_parameters(Net())
    assert n == 19144
    assert n < 20000


def test_parameter_count_of_the_table_adds_up(table):
    assert sum(r.params for r in table) == model.count_parameters(Net())


def test_forward_gives_log_probabilities():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 1, 28, 28)
    for mode in (net.train, net.eval):
        mode()
        out = net(x)
        assert out.shape == (4, 10)
        assert torch.isfinite(out).all()
        assert (out <= 0).all()
        torch.testing.assert_close(out.exp().sum(1), torch.ones(4))


def test_fast_and_original_dropout_have_the_same_weights():
    fast, original = Net(), Net(fast_dropout=False)
    a, b = fast.state_dict(), original.state_dict()
    assert list(a) == list(b)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(isinstance(m, model.Dropout) for m in fast.modules())
    assert not any(isinstance(m, model.Dropout) for m in original.modules())
    # Either loads the other's weights.
    original.load_state_dict(a)
    fast.load_state_dict(b)


def test_fast_and_original_dropout_agree_in_eval_mode():
    torch.manual_seed(0)
    fast = Net().eval()
    original = Net(fast_dropout=False).eval()
    original.load_state_dict(fast.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fast(x), original(x))


def test_format_layer_table(table):
    text = model.format_layer_table(table)
    assert "| 32 |" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines()[2:]}
    assert rows["conv6"][2] == "1x1"  # out size
    assert rows["conv6"][4] == "32"  # receptive field
    assert rows["conv1"][2] == "26x26"
    assert "19,144" in rows["**total**"][-1]


# ---------------------------------------------------------------------------------------------
# model.Dropout: the cheaper CPU mask.
# ---------------------------------------------------------------------------------------------
N = 1_000_000


def test_dropout_drops_ten_percent_and_scales_the_rest():
    torch.manual_seed(0)
    drop = model.Dropout(0.1).train()
    x = torch.rand(N) + 0.5  # no zeros in the input
    out = drop(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.9)


def test_dropout_kept_values_are_exactly_one_over_keep_probability():
    torch.manual_seed(1)
    out = model.Dropout(0.1).train()(torch.ones(N))
    kept = out[out != 0]
    assert kept.numel() > 0.85 * N
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.9))


def test_dropout_mask_has_no_pattern_across_the_tensor():
    # Two 32-bit draws come from each 64-bit number: neither half, and no region, is biased.
    torch.manual_seed(2)
    out = model.Dropout(0.1).train()(torch.ones(N))
    dropped = (out == 0).float()
    assert abs(dropped[0::2].mean().item() - 0.1) < 0.005
    assert abs(dropped[1::2].mean().item() - 0.1) < 0.005
    for part in dropped.chunk(4):
        assert abs(part.mean().item() - 0.1) < 0.01


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_dropout_other_rates(p):
    torch.manual_seed(3)
    out = model.Dropout(p).train()(torch.ones(N))
    assert abs((out == 0).float().mean().item() - p) < 0.005
    if p == 0:
        assert torch.equal(out, torch.ones(N))


def test_dropout_of_one_zeroes_everything_like_nn_dropout():
    x = torch.ones(10)
    assert torch.equal(model.Dropout(1.0).train()(x), nn.Dropout(1.0).train()(x))


def test_dropout_is_identity_in_eval_mode():
    x = torch.randn(1000)
    drop = model.Dropout(0.1).eval()
    assert torch.equal(drop(x), x)


def test_dropout_is_reproducible_under_manual_seed():
    drop = model.Dropout(0.1).train()
    x = torch.randn(10_000)
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)  # the generator has moved on
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(8)
    assert not torch.equal(a, drop(x))


@pytest.mark.parametrize("n", [1, 3, 1001])
def test_dropout_odd_sizes(n):
    torch.manual_seed(0)
    x = torch.rand(n) + 0.5
    out = model.Dropout(0.1).train()(x)
    assert out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.9)


def test_dropout_on_channels_last_tensor():
    torch.manual_seed(0)
    x = (torch.rand(16, 32, 24, 24) + 0.5).contiguous(memory_format=torch.channels_last)
    out = model.Dropout(0.1).train()(x)
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.9)


def test_dropout_on_non_contiguous_tensor():
    torch.manual_seed(0)
    x = (torch.rand(64, 64, 64) + 0.5).transpose(0, 2)[::2]
    assert not x.is_contiguous()
    out = model.Dropout(0.1).train()(x)
    assert out.shape == x.shape
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.9)


def test_dropout_gradient_uses_the_same_mask():
    torch.manual_seed(0)
    x = (torch.rand(10_000) + 0.5).requires_grad_()
    out = model.Dropout(0.1).train()(x)
    out.sum().backward()
    expected = torch.where(out == 0, 0.0, 1 / 0.9)
    torch.testing.assert_close(x.grad, expected)
