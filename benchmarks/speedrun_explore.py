"""Phase 1 of issue 33: the exploration behind the speedrun recipe (docs/speedrun.md).

Not a recipe runner: a short training loop of its own, so that a lever (model, batch, per-batch
OneCycle, Nesterov, label smoothing, augmentation, compile) can be tried without first wiring
it into train.py. Each run writes one JSON file under results/speedrun/explore/ (a run whose
file exists is skipped), with its history, its seconds of training (test passes excluded) and
of the whole run, and its settings.

    python benchmarks/speedrun_explore.py --time ARCH...      # seconds per step only
    python benchmarks/speedrun_explore.py --run NAME --seed 1 # one candidate, one seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import common  # noqa: E402
from model import CompactNet, SpeedNet, conv_bn_relu, count_parameters  # noqa: E402
from support.devices import keep_freed_memory  # noqa: E402
from support.fused_dropout import fuse_relu_dropout  # noqa: E402
from utils import get_loaders  # noqa: E402

OUT = ROOT / "results" / "speedrun" / "explore"

# Architectures: ("c", out, kernel, padding, dropout) a Conv-BN-ReLU(-Dropout) block, ("p",) a
# 2x2 max-pool, ("s", out, kernel, padding, dropout) a stride-2 block; GAP + Linear close each.
ARCHS: dict[str, list[tuple]] = {
    # pool after the first conv: the 24x24 conv of CompactNet now runs at 11x11
    "p1": [("c", 12, 3, 0, .02), ("p",), ("c", 24, 3, 0, .02), ("c", 24, 3, 0, .02), ("p",),
           ("c", 32, 3, 1, .02)],
    "p1w": [("c", 16, 3, 0, .02), ("p",), ("c", 24, 3, 0, .02), ("c", 32, 3, 0, .02), ("p",),
            ("c", 32, 3, 1, .02)],
    "p1n": [("c", 8, 3, 0, .02), ("p",), ("c", 16, 3, 0, .02), ("c", 24, 3, 0, .02), ("p",),
            ("c", 32, 3, 1, .02)],
    # two convs at full size, as CompactNet, but narrower
    "c2": [("c", 8, 3, 0, .02), ("c", 12, 3, 0, .02), ("p",), ("c", 20, 3, 0, .02),
           ("c", 24, 3, 0, .02), ("p",), ("c", 32, 3, 1, .02)],
    # a stride-2 first conv: 28 -> 13 at once
    "s1": [("s", 16, 3, 0, .02), ("c", 24, 3, 0, .02), ("c", 32, 3, 0, .02), ("p",),
           ("c", 32, 3, 1, .02)],
    # pool, 5x5 first conv
    "p5": [("c", 12, 5, 0, .02), ("p",), ("c", 24, 3, 0, .02), ("c", 32, 3, 0, .02), ("p",),
           ("c", 32, 3, 1, .02)],
    # dropout only on the 32 averages before the Linear: the course's check at no cost
    "p1h": [("c", 12, 3, 0, 0), ("p",), ("c", 24, 3, 0, 0), ("c", 24, 3, 0, 0), ("p",),
            ("c", 32, 3, 1, 0), ("d", .05)],
    "p1nh": [("c", 8, 3, 0, 0), ("p",), ("c", 16, 3, 0, 0), ("c", 24, 3, 0, 0), ("p",),
             ("c", 32, 3, 1, 0), ("d", .05)],
    "s1h": [("s", 16, 3, 0, 0), ("c", 24, 3, 0, 0), ("c", 28, 3, 0, 0), ("p",),
            ("c", 32, 3, 1, 0), ("d", .05)],
    # conv, pool, then BN-ReLU: the first block's BN and ReLU on 13x13, not 26x26
    "cp1h": [("cp", 12, 3, 0, 0), ("c", 24, 3, 0, 0), ("c", 24, 3, 0, 0), ("p",),
             ("c", 32, 3, 1, 0), ("d", .05)],
    "cp2h": [("cp", 16, 3, 0, 0), ("c", 24, 3, 0, 0), ("cp", 32, 3, 0, 0),
             ("c", 32, 3, 1, 0), ("d", .05)],
    # a stride-2 first conv (5x5, padded): 28 -> 14 with no pool and no 26x26 map at all
    "s5h": [("s", 16, 5, 2, 0), ("c", 24, 3, 0, 0), ("c", 24, 3, 0, 0), ("p",),
            ("c", 32, 3, 1, 0), ("d", .05)],
    "s3h": [("s", 16, 3, 1, 0), ("c", 24, 3, 0, 0), ("c", 24, 3, 0, 0), ("p",),
            ("c", 32, 3, 1, 0), ("d", .05)],
    "cp16h": [("cp", 16, 3, 0, 0), ("c", 24, 3, 0, 0), ("c", 28, 3, 0, 0), ("p",),
              ("c", 32, 3, 1, 0), ("d", .05)],
    "s5wh": [("s", 16, 5, 2, 0), ("c", 24, 3, 0, 0), ("c", 28, 3, 0, 0), ("p",),
             ("c", 32, 3, 1, 0), ("d", .05)],
}


class Arch(nn.Module):
    def __init__(self, spec: list[tuple], classes: int = 10) -> None:
        super().__init__()
        rows: list[tuple[str, nn.Module]] = []
        c, head_dropout = 1, 0.0
        for i, op in enumerate(spec):
            if op[0] == "p":
                rows.append((f"pool{i}", nn.MaxPool2d(2)))
                continue
            if op[0] == "d":
                head_dropout = op[1]
                continue
            kind, out, k, pad, p = op
            block = conv_bn_relu(c, out, k, dropout=p, padding=pad)
            if kind == "s":
                block[0].stride = (2, 2)
            if kind == "cp":  # conv, then pool, then BN-ReLU on a map 4x smaller
                block.insert(1, nn.MaxPool2d(2))
            rows.append((f"conv{i}", block))
            c = out
        rows += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten())]
        if head_dropout:
            rows.append(("drop", nn.Dropout(head_dropout)))
        rows.append(("fc", nn.Linear(c, classes)))
        self.features = nn.Sequential(OrderedDict(rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.features(x), dim=1)


def build(arch: str) -> nn.Module:
    if arch == "speednet":  # model.SpeedNet: cp16h as the recipe builds it (1x1 conv head)
        return SpeedNet()
    return CompactNet() if arch == "compact" else Arch(ARCHS[arch])


def prepared(arch: str, channels_last: bool) -> nn.Module:
    model = fuse_relu_dropout(build(arch))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(memory_format=fmt)


# ---------------------------------------------------------------------------------------------
# Seconds per step.
# ---------------------------------------------------------------------------------------------
def time_steps(arch: str, batch: int, channels_last: bool, compile_: bool, steps: int = 30
               ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = prepared(arch, channels_last)
    trained = torch.compile(model, dynamic=False) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.nll_loss(trained(x), y).backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warm = time.perf_counter() - t0
    # The least CPU time of 3 rounds: the machine is shared, and CPU time of one thread is
    # what another process's load disturbs least.
    rounds = []
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(steps // 3):
            step()
        rounds.append((time.process_time() - t0) / (steps // 3))
    per = min(rounds)
    return {"arch": arch, "batch": batch, "channels_last": channels_last, "compile": compile_,
            "parameters": count_parameters(model), "ms_per_step": per * 1e3,
            "s_per_epoch": per * 60000 / batch, "warmup_s": warm}


# ---------------------------------------------------------------------------------------------
# A training run.
# ---------------------------------------------------------------------------------------------
def train_run(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = prepared(cfg["arch"], cfg["channels_last"])
    fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    trained = torch.compile(model, dynamic=False) if cfg["compile"] else model
    train, test = get_loaders({"batch_size": cfg["batch"], "test_batch_size": 1000, "seed": seed,
                               "augmentation": cfg["augmentation"]}, ROOT / "data",
                              torch.device("cpu"))
    train.memory_format = test.memory_format = fmt  # the layout this run tries
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          nesterov=cfg["nesterov"], weight_decay=cfg["wd"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * len(train),
        pct_start=cfg["pct_start"], cycle_momentum=False,
        div_factor=cfg["div"], final_div_factor=cfg["final_div"])
    history: dict[str, list] = {"epoch": [], "test_acc": [], "train_s": [], "train_loss": []}
    train_s = 0.0
    for epoch in range(1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        model.train()
        total = torch.zeros(())
        for data, target in train:
            opt.zero_grad(set_to_none=True)
            out = trained(data)
            loss = F.nll_loss(out, target) if not cfg["smoothing"] else F.cross_entropy(
                out, target, label_smoothing=cfg["smoothing"])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        train_s += time.perf_counter() - t0
        acc = score(model, test) if (cfg["test_every"] or epoch == cfg["epochs"]) else None
        history["epoch"].append(epoch)
        history["test_acc"].append(acc)
        history["train_s"].append(round(train_s, 2))
        history["train_loss"].append(round(float(total) / len(train), 4))
        print(f"epoch {epoch}: loss {history['train_loss'][-1]:.4f} acc {acc} "
              f"train {train_s:.1f}s", flush=True)
    return {"config": cfg, "seed": seed, "parameters": count_parameters(model),
            "threads": torch.get_num_threads(), "history": history,
            "final_test_acc": history["test_acc"][-1], "train_seconds": round(train_s, 2),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2)}


@torch.inference_mode()
def score(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return round(100 * correct / len(loader.dataset), 2)


BASE: dict[str, Any] = {"arch": "p1", "batch": 256, "epochs": 6, "lr": 0.2, "momentum": 0.9,
                        "nesterov": True, "wd": 5e-4, "smoothing": 0.0, "pct_start": 0.25,
                        "div": 25.0, "final_div": 1e4, "augmentation": "rotate",
                        "channels_last": True, "compile": False, "test_every": True}


def config(name: str) -> dict[str, Any]:
    """A candidate's name: key=value pairs joined by ',' over BASE (e.g. arch=p1,epochs=5)."""
    cfg = dict(BASE)
    for part in filter(None, name.split(",")):
        key, value = part.split("=")
        cfg[key] = type(BASE[key])(value) if not isinstance(BASE[key], bool) else value == "1"
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time", nargs="*", help="archs to time, seconds per epoch only")
    p.add_argument("--batches", type=int, nargs="+", default=[256])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--run", nargs="*", default=[], help="candidates (see config)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--out", type=common.out_folder, default=OUT,
                   help="folder of the runs' JSON files")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    for arch in args.time or []:
        for batch in args.batches:
            for cl in (True, False):
                print(json.dumps(time_steps(arch, batch, cl, args.compile)), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.run:
        for seed in args.seeds:
            path = args.out / f"{name or 'base'}_t{args.threads}_seed{seed}.json"
            if path.exists():
                print(f"{path.name}: exists, skipped")
                continue
            result = train_run(config(name), seed)
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{path.name}: {result['final_test_acc']}% train {result['train_seconds']}s "
                  f"wall {result['wall_seconds']}s cpu {result['cpu_seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
