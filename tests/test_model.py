"""The network's shape and size, and the fast path's fused CPU ReLU + dropout
(support/fused_dropout.py), applied to a built Net."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn
from torchsummary import summary

import model
from model import Net
from support import fused_dropout
from support.fused_dropout import ReLUDropout, fuse_relu_dropout

SIZES = [26, 24, 12, 12, 12, 10, 5, 5, 3, 1]
RECEPTIVE_FIELDS = [3, 5, 6, 6, 10, 14, 16, 16, 24, 32]
JUMPS = [1, 1, 2, 2, 2, 2, 4, 4, 4, 4]
STAGES = ["conv1", "conv2", "pool1", "trans1", "conv3", "conv4", "pool2", "trans2", "conv5",
          "conv6"]


@pytest.fixture(scope="module")
def table() -> list[model.LayerInfo]:
    torch.manual_seed(0)
    return model.layer_table(Net())


@pytest.mark.quick
def test_the_layer_table_follows_the_write_up(table):
    assert [r.name for r in table] == STAGES
    assert [r.out_size for r in table] == SIZES
    assert [r.receptive_field for r in table] == RECEPTIVE_FIELDS
    assert [r.jump for r in table] == JUMPS
    # The last conv sees the whole 28x28 digit.
    assert table[-1].receptive_field >= 28
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


@pytest.mark.quick
def test_parameter_count(table):
    n = model.count_parameters(Net())
    assert n == 19200
    assert n < 20000
    assert sum(r.params for r in table) == n  # the table's column adds up


@pytest.mark.quick
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


def stage(net: Net, name: str) -> nn.Module:
    return getattr(net.features, name)


@pytest.mark.quick
def test_blocks_follow_the_write_ups_table():
    """Every conv but the last is Conv-BN-ReLU, the 1x1 reductions too; dropout follows
    conv1 and conv2 only; conv6 is a bare conv. The same in the fused form."""
    for fast in (True, False):
        net = fuse_relu_dropout(Net()) if fast else Net()
        for name in ("conv1", "conv2", "trans1", "conv3", "conv4", "trans2", "conv5"):
            block = stage(net, name)
            assert isinstance(block[0], nn.Conv2d), name
            assert isinstance(block[1], nn.BatchNorm2d), name
            dropped = any(isinstance(m, (nn.Dropout, ReLUDropout)) for m in block)
            assert dropped == (name in ("conv1", "conv2")), name
            assert isinstance(block[2], nn.ReLU if not dropped or not fast
                              else ReLUDropout), name
            if dropped and not fast:  # the original: nn.ReLU, then nn.Dropout
                assert type(block[3]) is nn.Dropout and len(block) == 4, name
        assert stage(net, "trans1")[0].kernel_size == (1, 1)
        assert stage(net, "trans2")[0].kernel_size == (1, 1)
        assert isinstance(stage(net, "conv6"), nn.Conv2d)


def test_every_plan_puts_dropout_after_each_3x3_block():
    net = Net(dropout_plan="every")
    dropped = [name for name, s in net.features.named_children()
               if any(isinstance(m, nn.Dropout) for m in s.modules())]
    assert dropped == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert net.state_dict().keys() == Net().state_dict().keys()  # dropout holds no weights
    assert not any(isinstance(m, (nn.Dropout, ReLUDropout))
                   for m in fuse_relu_dropout(Net(dropout_plan="none")).modules())


def test_an_unknown_dropout_plan_is_refused():
    with pytest.raises(ValueError, match="unknown dropout plan 'all'"):
        Net(dropout_plan="all")


def torchsummary_rows(net: nn.Module) -> list[str]:
    """The layer types of torchsummary's table, one per row, as the notebook prints it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary(net, (1, 28, 28), device="cpu")
    return [line.split()[0].rsplit("-", 1)[0] for line in out.getvalue().splitlines()
            if line.split() and line.split()[0].rsplit("-", 1)[-1].isdigit()]


def test_torchsummary_shows_the_tables_relu_and_dropout_rows():
    """What a learner sees of Net(): nn.ReLU and nn.Dropout, each on a row of its own, as the
    write-up's table lists them ("Dropout 1", "Dropout 2"); no fused module."""
    rows = torchsummary_rows(Net())
    assert rows.count("Dropout") == 2
    assert rows.count("ReLU") == 7
    assert "ReLUDropout" not in rows
    assert rows[:8] == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout",
                        "Conv2d", "BatchNorm2d", "ReLU", "Dropout"]
    # fused from outside, the same summary shows the fast path's form instead
    assert torchsummary_rows(fuse_relu_dropout(Net())).count("ReLUDropout") == 2


def test_net_is_built_from_torchs_own_modules_only():
    allowed = (Net, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.MaxPool2d,
               nn.AdaptiveAvgPool2d)
    for options in ({}, {"head": "gap"}, {"dropout_plan": "every"}, {"batch_norm": False},
                    {"transitions": "bare"}):
        assert all(type(m) in allowed for m in Net(**options).modules()), options


# ---------------------------------------------------------------------------------------------
# fuse_relu_dropout: the fast path's form, made from a built Net.
# ---------------------------------------------------------------------------------------------
OPTIONS = [{}, {"dropout_plan": "every"}, {"dropout_plan": "none"}, {"batch_norm": False},
           {"transitions": "bare"}, {"head": "gap"}, {"width": 0.7}]


@pytest.mark.parametrize("options", OPTIONS)
def test_fusing_keeps_every_state_dict_key_and_value(options):
    torch.manual_seed(0)
    net = Net(**options)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = fuse_relu_dropout(net)
    assert fused is net  # in place, and returned like torch.compile's wrapped model
    after = fused.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    dropped = sum(type(m) is nn.Dropout for m in Net(**options).modules())
    assert sum(isinstance(m, ReLUDropout) for m in fused.modules()) == dropped
    assert not any(type(m) is nn.Dropout for m in fused.modules())


@pytest.mark.parametrize("options", OPTIONS)
def test_the_fused_model_gives_the_plain_ones_eval_output(options):
    torch.manual_seed(0)
    plain = Net(**options)
    for m in plain.modules():  # running statistics that are not the defaults' 0 and 1
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fused = Net(**options)
    fused.load_state_dict(plain.state_dict())
    fuse_relu_dropout(fused)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_fusing_twice_changes_nothing():
    once = fuse_relu_dropout(Net(dropout_plan="every"))
    shape = repr(once)
    keys = list(once.state_dict())
    fused_modules = [m for m in once.modules() if isinstance(m, ReLUDropout)]
    twice = fuse_relu_dropout(once)
    assert repr(twice) == shape
    assert list(twice.state_dict()) == keys
    # the very same modules, not new ones
    assert [m for m in twice.modules() if isinstance(m, ReLUDropout)] == fused_modules


def test_a_relu_without_dropout_and_a_dropout_subclass_are_left_alone():
    class OtherDropout(nn.Dropout):
        pass

    alone, other = nn.ReLU(), OtherDropout(0.2)
    seq = nn.Sequential(nn.Conv2d(1, 2, 1), alone, nn.Conv2d(2, 2, 1), nn.ReLU(), other,
                        nn.Sequential(nn.ReLU(), nn.Dropout(0.3)))  # a nested pair is fused
    fuse_relu_dropout(seq)
    assert seq[1] is alone and seq[4] is other and type(seq[3]) is nn.ReLU
    assert isinstance(seq[5][0], ReLUDropout) and seq[5][0].p == 0.3 and len(seq[5]) == 1


def test_fusing_a_pair_mid_sequence_keeps_the_later_keys():
    seq = nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(1, 1, 1))
    keys = list(seq.state_dict())
    fuse_relu_dropout(seq)
    assert list(seq.state_dict()) == keys == ["2.weight", "2.bias"]
    assert isinstance(seq[0], ReLUDropout) and isinstance(seq[1], nn.Conv2d)


@pytest.mark.quick
def test_format_layer_table(table):
    text = model.format_layer_table(table)
    assert "| 32 |" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines()[2:]}
    assert rows["conv6"][2] == "1x1"  # out size
    assert rows["conv6"][4] == "32"  # receptive field
    assert rows["conv1"][2] == "26x26"
    assert "19,200" in rows["**total**"][-1]


# ---------------------------------------------------------------------------------------------
# fused_dropout.ReLUDropout: ReLU then dropout, with the cheaper CPU mask.
# ---------------------------------------------------------------------------------------------
N = 1_000_000
KEEP_SCALE = 1 / 0.9


def relu_dropout(x: torch.Tensor, p: float = 0.1) -> torch.Tensor:
    return ReLUDropout(p).train()(x)


def test_drops_ten_percent_and_scales_the_rest_exactly_as_nn_dropout():
    torch.manual_seed(0)
    x = torch.rand(N) + 0.5  # positive: ReLU leaves it alone, so every zero is a drop
    out = relu_dropout(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.002
    torch.testing.assert_close(out[~dropped], x[~dropped] * KEEP_SCALE)
    torch.manual_seed(1)
    out = relu_dropout(torch.ones(N))
    kept = out[out != 0]
    assert kept.numel() > 0.89 * N
    assert torch.equal(kept, torch.full_like(kept, KEEP_SCALE))


def test_negative_inputs_come_out_zero_as_after_relu():
    torch.manual_seed(2)
    x = torch.randn(N)
    out = relu_dropout(x)
    assert torch.equal(out[x <= 0], torch.zeros_like(out[x <= 0]))
    positive = x > 0
    kept = positive & (out != 0)
    assert abs(kept.sum().item() / positive.sum().item() - 0.9) < 0.003
    torch.testing.assert_close(out[kept], x[kept] * KEEP_SCALE)


def test_mask_has_no_pattern_across_the_tensor():
    # Four 16-bit uniforms come from each 64-bit draw: no lane, and no region, is biased.
    torch.manual_seed(3)
    dropped = (relu_dropout(torch.ones(N)) == 0).float()
    for lane in range(4):
        assert abs(dropped[lane::4].mean().item() - 0.1) < 0.003
    for part in dropped.chunk(4):
        assert abs(part.mean().item() - 0.1) < 0.003
    # Neighbours are independent: P(both dropped) = 0.01, not more.
    assert abs((dropped[:-1] * dropped[1:]).mean().item() - 0.01) < 0.001


def test_keep_mask_threshold_is_p_to_within_1e_5():
    # 2^16 levels: the drop rate is round(p * 65536) / 65536.
    for p in (0.1, 0.25, 0.5):
        assert abs(round(p * 2**16) / 2**16 - p) < 1e-5
    x = torch.empty(4 * 2**16)
    torch.manual_seed(4)
    assert abs((~fused_dropout.keep_mask(x, 0.5)).float().mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_other_rates_behave_like_relu_then_nn_dropout(p):
    torch.manual_seed(5)
    x = torch.rand(N) + 0.5
    out = relu_dropout(x, p)
    assert abs((out == 0).float().mean().item() - p) < 0.005
    if p == 0:
        assert torch.equal(out, x)
    if p == 1:
        assert torch.equal(out, torch.zeros_like(x))


def test_rejects_a_rate_outside_zero_to_one():
    with pytest.raises(ValueError, match="dropout probability"):
        ReLUDropout(1.5)


def test_eval_mode_is_plain_relu():
    x = torch.randn(1000)
    assert torch.equal(ReLUDropout(0.1).eval()(x), torch.relu(x))


def test_is_reproducible_under_manual_seed():
    drop = ReLUDropout(0.1).train()
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


@pytest.mark.parametrize("n", [1, 3, 5, 1001])
def test_sizes_that_are_not_a_multiple_of_four(n):
    torch.manual_seed(0)
    x = torch.rand(n) + 0.5
    out = relu_dropout(x)
    assert out.shape == x.shape
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * KEEP_SCALE)


def test_keeps_a_channels_last_layout():
    torch.manual_seed(0)
    x = (torch.rand(16, 32, 24, 24) + 0.5).contiguous(memory_format=torch.channels_last)
    out = relu_dropout(x)
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(out[~dropped], x[~dropped] * KEEP_SCALE)


def test_non_contiguous_input():
    torch.manual_seed(0)
    x = (torch.rand(64, 64, 64) + 0.5).transpose(0, 2)[::2]
    assert not x.is_contiguous()
    out = relu_dropout(x)
    assert out.shape == x.shape
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    torch.testing.assert_close(out[~dropped], x[~dropped] * KEEP_SCALE)


def test_gradient_matches_relu_then_nn_dropout_under_the_same_mask():
    # Rebuild nn.Dropout's computation with the mask ReLUDropout drew: same output and grad.
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    out = relu_dropout(x)
    out.pow(2).sum().backward()
    mask = ((out != 0) | (x <= 0)).float()  # kept, as far as the output can tell
    y = x.detach().clone().requires_grad_()
    ref = torch.relu(y) * mask * KEEP_SCALE
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, y.grad)


def test_the_gap_head_draws_the_tables_weights_in_the_tables_order():
    """Weights are drawn from the seeded generator as each conv is built: the head comes
    last, so with one seed the GAP form starts from the table's conv1..conv5 (and the table's
    model from the weights its seed always gave)."""
    torch.manual_seed(1)
    table = Net().state_dict()
    torch.manual_seed(1)
    gap = Net(head="gap").state_dict()
    shared = [k for k in table if not k.startswith("features.conv6")]
    assert all(torch.equal(table[k], gap[k]) for k in shared)
    assert gap["features.conv6.weight"].shape == (10, 32, 1, 1)
