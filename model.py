"""The S6 network: a sub-20k-parameter CNN for MNIST, and the tools to inspect it.

It follows the original write-up's table row by row: output sizes 26 -> 24 -> maxpool 12 -> 1x1
12 -> 12 (padded) -> 10 -> maxpool 5 -> 1x1 5 -> 3 -> 1. Every conv but the last, the two 1x1
channel reductions included, is Conv-BN-ReLU; 10% dropout follows conv1 and conv2 only ("Dropout
1", "Dropout 2"); the last conv has no activation and feeds log-softmax.

Read top to bottom: the options, `Net` (the table, one line per row), the helpers its rows are
built with, and its parameter count and receptive-field table. The fast path trains this same
model with each ReLU + Dropout pair fused into one module on the CPU; that form is made from a
built `Net` from outside, by support/fused_dropout.py's `fuse_relu_dropout`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Channels of each conv, in order. See README "Architecture" for why this plan was chosen.
CHANNELS: tuple[int, ...] = (8, 16, 12, 24, 32, 16, 32, 10)
DROPOUT = 0.1
# Which 3x3 blocks are followed by dropout. "table" is the write-up's table (Dropout 1 and 2,
# after conv1 and conv2); "every" is the looser reading of its opening sentence, measured in the
# README's results; "none" is for the ablation.
DROPOUT_PLANS: dict[str, tuple[str, ...]] = {
    "table": ("conv1", "conv2"),
    "every": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "none": (),
}
# What the two 1x1 channel reductions are: "bn-relu" is the table's Conv-BN-ReLU; "bare" is a
# plain 1x1 conv (a linear mix of channels), for the ablation.
TRANSITIONS: tuple[str, ...] = ("bn-relu", "bare")
# How conv5's 3x3 map becomes 10 scores: "conv" is the table's Conv6 (a 3x3 conv to 1x1);
# "gap" averages the map to 1x1 (global average pooling), then a 1x1 conv mixes 32 -> 10.
HEADS: tuple[str, ...] = ("conv", "gap")
MAX_WIDTH = 4.0  # a width multiplier above this is a typo, not an experiment


def scaled_channels(width: float = 1.0) -> tuple[int, ...]:
    """CHANNELS with every conv's width times `width`, rounded to the nearest integer (halves
    up, at least 1); the last conv keeps its 10 classes."""
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"width must be in (0, {MAX_WIDTH:g}], got {width}")
    *hidden, classes = CHANNELS
    return (*(max(1, math.floor(c * width + 0.5)) for c in hidden), classes)


class Net(nn.Module):
    """The S6 CNN. `forward` returns log-probabilities of shape (N, 10).

    The defaults are the write-up's table, module for module: Conv-BN-ReLU blocks, nn.Dropout
    after conv1 and conv2. Options for the experiments and the ablation:
    `dropout_plan` names the blocks followed by dropout (a key of DROPOUT_PLANS);
    `batch_norm=False` removes every BatchNorm and gives each conv a bias;
    `transitions="bare"` makes the two 1x1 reductions plain convs (no BN-ReLU);
    `head="gap"` replaces conv6 by global average pooling and a 1x1 conv;
    `width` scales every channel count (see scaled_channels).
    The fast path trains the same model with each ReLU + Dropout fused into one module
    (support/fused_dropout.py); the weights and their state_dict keys are the same.
    """

    def __init__(self, channels: tuple[int, ...] | None = None, dropout: float = DROPOUT,
                 dropout_plan: str = "table", batch_norm: bool = True,
                 transitions: str = "bn-relu", head: str = "conv", width: float = 1.0) -> None:
        super().__init__()
        for name, value, known in (("dropout plan", dropout_plan, DROPOUT_PLANS),
                                   ("transitions", transitions, TRANSITIONS),
                                   ("head", head, HEADS)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(known)}")
        self.channels = channels = channels or scaled_channels(width)
        c1, c2, t1, c3, c4, t2, c5, out = channels
        # The dropout after each 3x3 block: `dropout` where the plan puts some, else none.
        drop = {name: dropout if name in DROPOUT_PLANS[dropout_plan] else 0.0
                for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
        bn = batch_norm  # short, so that each row of the table fits on one line

        # The write-up's table, one row per stage: its output size and receptive field in the
        # comment. Built top to bottom: each conv draws its initial weights from the seeded
        # generator as it is made, so this order fixes every weight a seed gives.
        rows: list[tuple[str, nn.Module]] = [
            ("conv1", conv_bn_relu(1, c1, 3, bn, drop["conv1"])),  # 28 -> 26, RF 3
            ("conv2", conv_bn_relu(c1, c2, 3, bn, drop["conv2"])),  # 26 -> 24, RF 5
            ("pool1", nn.MaxPool2d(2, 2)),  # 24 -> 12, RF 6
            ("trans1", transition(c2, t1, transitions, bn)),  # 12 -> 12, RF 6
            ("conv3", conv_bn_relu(t1, c3, 3, bn, drop["conv3"], padding=1)),  # 12 -> 12, RF 10
            ("conv4", conv_bn_relu(c3, c4, 3, bn, drop["conv4"])),  # 12 -> 10, RF 14
            ("pool2", nn.MaxPool2d(2, 2)),  # 10 -> 5, RF 16
            ("trans2", transition(c4, t2, transitions, bn)),  # 5 -> 5, RF 16
            ("conv5", conv_bn_relu(t2, c5, 3, bn, drop["conv5"])),  # 5 -> 3, RF 24
        ]
        if head == "conv":  # the table's conv6: no BatchNorm, no ReLU, straight to log-softmax
            rows.append(("conv6", nn.Conv2d(c5, out, 3, bias=not bn)))  # 3 -> 1, RF 32
        else:  # "gap": each channel's mean, then a 1x1 conv mixes c5 channels into 10
            rows.append(("gap", nn.AdaptiveAvgPool2d(1)))  # 3 -> 1, RF 32
            rows.append(("conv6", nn.Conv2d(c5, out, 1, bias=not bn)))  # 1 -> 1, RF 32
        self.features = nn.Sequential(OrderedDict(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return F.log_softmax(x.flatten(1), dim=1)


def conv_bn_relu(c_in: int, c_out: int, kernel: int, batch_norm: bool = True,
                 dropout: float = 0.0, padding: int = 0) -> nn.Sequential:
    """Conv-BN-ReLU, then Dropout(dropout) when it is not 0: one row of the table.

    No conv bias: BatchNorm's shift makes it redundant. `batch_norm=False` (the ablation)
    drops the BatchNorm and gives the conv the bias it then needs: Conv-ReLU. The weights sit
    at indices 0 (conv) and 1 (BatchNorm) either way, so their state_dict keys never move.
    """
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, padding=padding, bias=not batch_norm)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(c_out)] if batch_norm else [conv]
    layers.append(nn.ReLU())
    if dropout != 0:  # not `> 0`: nn.Dropout refuses a negative rate, which is a typo
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def transition(c_in: int, c_out: int, kind: str = "bn-relu",
               batch_norm: bool = True) -> nn.Sequential:
    """A 1x1 channel reduction: the table's Conv-BN-ReLU ("bn-relu"), or a plain 1x1 conv
    ("bare", the ablation), still in a Sequential so that its weight keeps its state_dict key
    (trans1.0.weight)."""
    if kind == "bare":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=not batch_norm))
    return conv_bn_relu(c_in, c_out, 1, batch_norm)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, the figure torchsummary reports."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    out_size: int
    out_channels: int
    receptive_field: int
    jump: int
    params: int


def _geometry(module: nn.Module, in_size: int) -> tuple[int, int]:
    """(kernel, stride) of the spatial ops inside a stage, as one op; global average
    pooling acts as one kernel the size of its input. A stage that pools after its conv (the
    speedrun's first) is one kernel of k1 + (k2 - 1) * s1 with stride s1 * s2."""
    def first(v: int | tuple[int, ...]) -> int:
        return v[0] if isinstance(v, tuple) else int(v)

    ops = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            ops.append((first(m.kernel_size), first(m.stride)))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            ops.append((in_size, in_size))
    if not ops:
        raise ValueError(f"no conv or pool in {module}")
    kernel, stride = ops[0]
    for k, s in ops[1:]:
        kernel, stride = kernel + (k - 1) * stride, stride * s
    return kernel, stride


class LayerTable(list):
    """layer_table's rows; a notebook shows them as the Markdown table (format_layer_table)."""

    def _repr_markdown_(self) -> str:
        return format_layer_table(self)

    def __repr__(self) -> str:
        return format_layer_table(self)


def layer_table(model: nn.Module, input_size: int = 28) -> LayerTable:
    """Per-stage output size, receptive field and jump, read off the model itself; as the last
    line of a notebook cell it shows as a Markdown table, a total row last.

    Sizes come from a real forward pass (hooks), so they can never disagree with the model;
    receptive field r and jump j follow the usual recurrence r += (k - 1) * j, j *= s.
    """
    sizes: dict[str, tuple[int, int, int]] = {}  # name -> (in size, out size, out channels)
    hooks = [
        stage.register_forward_hook(
            lambda _m, i, out, name=name: sizes.__setitem__(
                name, (i[0].shape[-1], out.shape[-1], out.shape[1]))
        )
        for name, stage in model.features.named_children()
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 1, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    rows, rf, jump = [], 1, 1
    for name, stage in model.features.named_children():
        in_size, size, channels = sizes[name]
        kernel, stride = _geometry(stage, in_size)
        rf += (kernel - 1) * jump
        jump *= stride
        rows.append(LayerInfo(name, _kind(stage), size, channels, rf, jump,
                              count_parameters(stage)))
    return LayerTable(rows)


def _kind(stage: nn.Module) -> str:
    """A stage's op for the table: maxpool, gap, or its conv's kernel (+ pool if it pools)."""
    parts = list(stage.modules())
    if any(isinstance(m, nn.AdaptiveAvgPool2d) for m in parts):
        return "gap"
    conv = next((m for m in parts if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return "maxpool"
    k = conv.kernel_size[0]
    return f"conv{k}x{k}" + ("+pool" if any(isinstance(m, nn.MaxPool2d) for m in parts) else "")


def format_layer_table(rows: list[LayerInfo]) -> str:
    """The table as Markdown, the form the README and the notebook print."""
    lines = [
        "| layer | op | out size | out ch | RF | jump | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.kind} | {r.out_size}x{r.out_size} | {r.out_channels} "
                     f"| {r.receptive_field} | {r.jump} | {r.params:,} |")
    lines.append(f"| **total** | | | | | | **{sum(r.params for r in rows):,}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The compact model: the course's checks in under 8,000 parameters (docs/compact.md).
# ---------------------------------------------------------------------------------------------
COMPACT_DROPOUT = 0.02  # after every 3x3 block: the exploratory runs' best (docs/compact.md)


class CompactNet(nn.Module):
    """A 7,594-parameter CNN for MNIST: Conv-BN-ReLU blocks, a max-pool and a 1x1 reduction
    after the first two, three more 3x3 blocks, global average pooling and a 1x1 conv to the
    10 classes. `forward` returns log-probabilities of shape (N, 10).

    Every 3x3 block is followed by nn.Dropout(`dropout`) (the fast path fuses each ReLU +
    Dropout pair, as for Net). No padding anywhere: output sizes 26 -> 24 -> 12 -> 12 -> 10 ->
    8 -> 6 -> 1. Built with Net's helpers, so its stages read like Net's table.
    """

    def __init__(self, dropout: float = COMPACT_DROPOUT) -> None:
        super().__init__()
        self.channels = (10, 16, 10, 14, 16, 16, 10)
        c1, c2, t1, c3, c4, c5, out = self.channels
        p = dropout
        rows: list[tuple[str, nn.Module]] = [
            ("conv1", conv_bn_relu(1, c1, 3, dropout=p)),  # 28 -> 26, RF 3
            ("conv2", conv_bn_relu(c1, c2, 3, dropout=p)),  # 26 -> 24, RF 5
            ("pool1", nn.MaxPool2d(2, 2)),  # 24 -> 12, RF 6
            ("trans1", conv_bn_relu(c2, t1, 1)),  # 12 -> 12, RF 6
            ("conv3", conv_bn_relu(t1, c3, 3, dropout=p)),  # 12 -> 10, RF 10
            ("conv4", conv_bn_relu(c3, c4, 3, dropout=p)),  # 10 -> 8, RF 14
            ("conv5", conv_bn_relu(c4, c5, 3, dropout=p)),  # 8 -> 6, RF 18
            ("gap", nn.AdaptiveAvgPool2d(1)),  # 6 -> 1, RF 28
            ("conv6", nn.Conv2d(c5, out, 1, bias=False)),  # 1 -> 1: 16 averages -> 10 scores
        ]
        self.features = nn.Sequential(OrderedDict(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return F.log_softmax(x.flatten(1), dim=1)


# ---------------------------------------------------------------------------------------------
# The speedrun's model: 99.4% on a laptop CPU in about a minute (docs/speedrun.md).
# ---------------------------------------------------------------------------------------------
SPEED_DROPOUT = 0.05  # on the 32 averages before the last layer only (docs/speedrun.md)


class SpeedNet(nn.Module):
    """An 18,242-parameter CNN for MNIST built for a CPU's time: every map is small early.
    `forward` returns log-probabilities of shape (N, 10).

    Where CompactNet spends ~60% of its arithmetic on a second 3x3 conv at 24x24, SpeedNet
    max-pools its first conv's 26x26 maps straight away, before BatchNorm and ReLU, so that
    both run on 13x13 maps (a quarter of the work; a max-pool commutes with ReLU, not with a
    BatchNorm, which here normalises the pooled maps). Its other convs are wider and run at
    11x11 and smaller. The one nn.Dropout acts on the 32 channel averages, where it costs
    nothing: dropout on every block's maps cost ~20% of a step (docs/speedrun.md). Output
    sizes 26 (pooled to 13) -> 11 -> 9 -> 4 -> 4 -> 1.
    """

    def __init__(self, dropout: float = SPEED_DROPOUT) -> None:
        super().__init__()
        self.channels = (16, 24, 28, 32, 10)
        c1, c2, c3, c4, out = self.channels
        first = conv_bn_relu(1, c1, 3)
        first.insert(1, nn.MaxPool2d(2, 2))  # Conv-Pool-BN-ReLU
        rows: list[tuple[str, nn.Module]] = [
            ("conv1", first),  # 28 -> 26 -> pooled 13, RF 4
            ("conv2", conv_bn_relu(c1, c2, 3)),  # 13 -> 11, RF 8
            ("conv3", conv_bn_relu(c2, c3, 3)),  # 11 -> 9, RF 12
            ("pool", nn.MaxPool2d(2, 2)),  # 9 -> 4, RF 14
            ("conv4", conv_bn_relu(c3, c4, 3, padding=1)),  # 4 -> 4, RF 22
            ("gap", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))),  # 4 -> 1
            ("fc", nn.Conv2d(c4, out, 1)),  # 1 -> 1: a Linear from 32 averages to 10 scores
        ]
        self.features = nn.Sequential(OrderedDict(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return F.log_softmax(x.flatten(1), dim=1)


# ---------------------------------------------------------------------------------------------
# The tiny model: every seed past 99.4% in fewer parameters than any public result (docs/tiny.md).
# ---------------------------------------------------------------------------------------------
TINY_CHANNELS: tuple[int, ...] = (6, 8, 10, 10, 12, 16, 10)
TINY_DROPOUT = 0.02  # on the 16 averages before the last layer only


def tiny_channels(width: float = 1.0) -> tuple[int, ...]:
    """TINY_CHANNELS with every hidden conv's width times `width`, rounded as scaled_channels
    rounds (halves up, at least 1); the 10 classes stay. The size search of docs/tiny.md."""
    if not 0 < width <= MAX_WIDTH:
        raise ValueError(f"width must be in (0, {MAX_WIDTH:g}], got {width}")
    *hidden, classes = TINY_CHANNELS
    return (*(max(1, math.floor(c * width + 0.5)) for c in hidden), classes)


class TinyNet(nn.Module):
    """A 3,672-parameter CNN for MNIST: five padded 3x3 Conv-BN-ReLU blocks at 28, 14 and 7
    pixels, a 1x1 Conv-BN-ReLU widening the last maps, global average pooling, dropout and a
    1x1 conv to the 10 classes. `forward` returns log-probabilities of shape (N, 10).

    Padding keeps every map at full size until a max-pool halves it, so the few channels see
    the whole digit at each resolution: depth, not width, grows the receptive field (24 at the
    pool). A narrowed CompactNet, whose unpadded convs shrink the maps, fell short at this
    size (docs/tiny.md). The 1x1 widening gives the classifier 16 averages, not 12, for 224
    parameters, at 7x7 where a layer costs little time. The one nn.Dropout acts on the channel
    averages, where it costs nothing. `width` scales every hidden conv (tiny_channels): 1.0 is
    the named recipe's.
    """

    def __init__(self, dropout: float = TINY_DROPOUT, width: float = 1.0) -> None:
        super().__init__()
        self.channels = tiny_channels(width)
        c1, c2, c3, c4, c5, c6, out = self.channels
        rows: list[tuple[str, nn.Module]] = [
            ("conv1", conv_bn_relu(1, c1, 3, padding=1)),  # 28 -> 28, RF 3
            ("conv2", conv_bn_relu(c1, c2, 3, padding=1)),  # 28 -> 28, RF 5
            ("pool1", nn.MaxPool2d(2, 2)),  # 28 -> 14, RF 6
            ("conv3", conv_bn_relu(c2, c3, 3, padding=1)),  # 14 -> 14, RF 10
            ("conv4", conv_bn_relu(c3, c4, 3, padding=1)),  # 14 -> 14, RF 14
            ("pool2", nn.MaxPool2d(2, 2)),  # 14 -> 7, RF 16
            ("conv5", conv_bn_relu(c4, c5, 3, padding=1)),  # 7 -> 7, RF 24
            ("conv6", conv_bn_relu(c5, c6, 1)),  # 7 -> 7, RF 24: more averages for the classifier
            ("gap", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Dropout(dropout))),  # 7 -> 1
            ("fc", nn.Conv2d(c6, out, 1)),  # 1 -> 1: a Linear from the averages to 10 scores
        ]
        self.features = nn.Sequential(OrderedDict(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return F.log_softmax(x.flatten(1), dim=1)
