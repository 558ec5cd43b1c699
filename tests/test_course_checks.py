"""The course's own checks on `Net()`, written the way the graders' test_model.py files are.

The course (ERA S6) runs a small test file on the submission's `Net()` in GitHub Actions. Its
reference repository and the peers' repositories assert the same five things, each by a
plain scan of `model.modules()` or a forward pass; these tests repeat them as they are. The
default `Net()` is the write-up's table, whose last layer is a 3x3 conv: it has neither a
global average pool nor a Linear layer, so that check is run on the GAP form, `--head gap`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import Net
from support.fused_dropout import fuse_relu_dropout

pytestmark = pytest.mark.quick  # the course's checks, all of them, are in the quick tier


def total_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_total_parameters_under_20k():
    assert total_parameters(Net()) < 20000
    assert total_parameters(Net(head="gap")) < 20000


def test_uses_batch_normalization():
    assert any(isinstance(m, nn.BatchNorm2d) for m in Net().modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in Net(head="gap").modules())


def test_uses_dropout():
    # Net() has nn.Dropout itself; the fast path's fused ReLU + dropout, made from it by
    # fuse_relu_dropout, is an nn.Dropout too: found by type either way.
    assert any(isinstance(m, nn.Dropout) for m in Net().modules())
    assert any(isinstance(m, nn.Dropout) for m in fuse_relu_dropout(Net()).modules())
    assert any(isinstance(m, nn.Dropout) for m in Net(head="gap").modules())


def test_gap_form_uses_global_average_pooling_or_a_linear_layer():
    def has_gap_or_fc(model: nn.Module) -> bool:
        return any(isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear))
                   for m in model.modules())

    assert has_gap_or_fc(Net(head="gap"))
    assert not has_gap_or_fc(Net())  # the table's conv6, as the README's checklist says


def test_output_shape_is_one_by_ten():
    for net in (Net(), Net(head="gap")):
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_the_fast_paths_fused_form_passes_the_same_checks():
    """What the fast path trains, fuse_relu_dropout(Net()), passes each check Net() passes."""
    for net in (fuse_relu_dropout(Net()), fuse_relu_dropout(Net(head="gap"))):
        assert total_parameters(net) < 20000
        assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert any(isinstance(m, nn.Dropout) for m in net.modules())
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)
