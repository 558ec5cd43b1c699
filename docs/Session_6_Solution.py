# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,docs//py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Session 6: MNIST to 99.4% with under 20k parameters
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/s6-mnist/blob/main/Session_6_Solution.ipynb)
#
# This notebook trains the S6 network, a CNN of 19,200 parameters built as the write-up's
# table, to 99.4%+ on MNIST's test set in 20 epochs: the data, the model, SGD with StepLR
# and the epoch loop, in view. The network is in `model.py`; the loaders, `train`, `test`,
# the checkpoint pair and the plots in `utils.py`.
#
# Every epoch is saved in `CHECKPOINT` (the settings cell): run the training cell again after
# an interruption and it goes on from the last saved epoch; a finished run is loaded, not
# trained again.

# %% [markdown]
# In Colab, the next cell fetches `model.py`, `utils.py` and the rest of the repository when they
# are not beside the notebook (set `REPO` to yours), and installs `torchsummary`.

# %%
import importlib.util, os, subprocess, sys
REPO = "your-github-user/s6-mnist"  # publishers: see docs/publishing.md; the badges use it too
if not os.path.exists("model.py") and REPO.startswith("your-github-user/"):
    print("model.py is not beside this notebook: set REPO above to the GitHub repository that holds it, or upload the repository's files, then run this cell again.")
elif not os.path.exists("model.py"):  # no password prompt: a wrong REPO fails at once
    git = subprocess.run(["git", "clone", "--depth", "1", f"https://github.com/{REPO}", "s6-mnist"], capture_output=True, text=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    if os.path.exists("s6-mnist/model.py"):
        os.chdir("s6-mnist")
    else:
        print(f"could not clone https://github.com/{REPO}: {(git.stderr.strip().splitlines() or ['git failed'])[-1]}")
if importlib.util.find_spec("torchsummary") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torchsummary"])

# %%
import os
import sys
import time

import matplotlib.pyplot as plt
import torch
from torchsummary import summary

from model import Net, layer_table
from utils import (get_loaders, load_checkpoint, plot_history, plot_mistakes, prepare_model,
                   save_checkpoint, test, train)

# The write-up's recipe: SGD with momentum, StepLR, 20 epochs of batch 128 (docs/experiments.md
# lists this project's switches, each defaulting to the write-up's choice).
recipe = dict(epochs=20, batch_size=128, test_batch_size=1000, lr=0.01, momentum=0.9,
              step_size=15, gamma=0.1, seed=1)
CHECKPOINT = "checkpoints/notebook.pt"  # every epoch is saved here; in Colab, on Google Drive
RETRAIN = False  # True: train from scratch even when CHECKPOINT holds a finished run
IMAGES, DATA = "images", "data"  # a complete run's figures; MNIST, fetched on first use
SMOKE = os.environ.get("S6_SMOKE") or "0"  # "1": 1 epoch on 2,048 images (the tests)
if SMOKE not in ("0", "1"):
    raise ValueError(f"S6_SMOKE={SMOKE!r} is not a setting: use S6_SMOKE=1 for the smoke run, "
                     "or 0 (or leave it unset) for the full run")
if SMOKE == "1":  # a quick check: it must not touch a full run's checkpoint or figures
    recipe.update(epochs=1, limit_train=2048, limit_test=1000)
    CHECKPOINT, RETRAIN, IMAGES = "checkpoints/notebook-smoke.pt", True, None
plt.rcParams["figure.dpi"] = 80  # inline figures only (images/ is saved at 120 dpi)
device = torch.device("cuda" if torch.cuda.is_available() else
                      "mps" if torch.backends.mps.is_available() else "cpu")
print(f"device: {device}")
if device.type == "cpu" and "google.colab" in sys.modules:
    print("This Colab runtime has no GPU, so training runs on its CPU (slowly). For a GPU: "
          "Runtime > Change runtime type > T4 GPU > Save, then run all cells again.")

# %% [markdown]
# ## Data
# Below: a training batch as the model sees it, after the random crop-resize (10% of images)
# and rotation (±15°): `augment` in `utils.py` applies them in the write-up's order.
# `get_loaders` fetches MNIST into `data/` the first time, each file checked against its
# published MD5.

# %%
samples, _ = get_loaders({**recipe, "batch_size": 24, "seed": 0}, DATA, device)
images, labels = next(iter(samples))
samples_fig, axes = plt.subplots(3, 8, figsize=(11, 4.8), layout="constrained")
for ax, image, label in zip(axes.flat, images.cpu(), labels.tolist(), strict=True):
    ax.imshow(image[0], cmap="gray", interpolation="nearest")  # each pixel a crisp square
    ax.set_title(f"label {label}")
    ax.axis("off")
samples_fig.suptitle("Augmented training samples")
plt.show()

# %% [markdown]
# ## The network
# `Net` in `model.py` is the write-up's table, one line per row. The table below, with each
# layer's receptive field and parameters, is computed from the model itself.

# %% tags=["nbval-check-output"]
layer_table(Net())

# %% [markdown]
# `torchsummary` lists each BatchNorm on a row of its own, where the table above counts it with
# its conv: conv1's 72 weights (8 filters of 3x3) and its BatchNorm's 16 (a scale and a shift
# per channel) are the table's 88. The totals agree.

# %%
summary(Net(), (1, 28, 28), device="cpu")

# %% [markdown]
# ## Training
# The model, SGD (lr 0.01, momentum 0.9) and StepLR (step 15, gamma 0.1) are built from the
# recipe, then the loop runs `train` and `test` (in `utils.py`) once per epoch, steps the
# schedule and saves the epoch. `prepare_model` moves the model to the device; with the fast
# loader it also swaps each ReLU + Dropout for one fused module (same function, same weights).
#
# `load_checkpoint` puts back what `CHECKPOINT` holds (the weights, SGD's momentum, StepLR's
# step, the history and the random state), so a run interrupted by a time-out, a closed tab or
# the stop button goes on from its last saved epoch when this cell runs again. A finished run
# is loaded rather than trained again (`RETRAIN = True` trains it again). A checkpoint of
# another recipe, or a model, SGD or StepLR that is not the recipe's, is refused, saying what
# differs. The cells below save their figures in `images/` only when the run has all its
# epochs.

# %%
torch.manual_seed(recipe["seed"])  # the same initial weights each time this cell runs
model = prepare_model(Net(), recipe, device)
optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe["step_size"],
                                            gamma=recipe["gamma"])
train_loader, test_loader = get_loaders(recipe, DATA, device)
history = load_checkpoint(CHECKPOINT, model, optimizer, scheduler, train_loader, recipe, RETRAIN)
for epoch in range(len(history) + 1, recipe["epochs"] + 1):
    lr, start = scheduler.get_last_lr()[0], time.perf_counter()
    train_loss, train_acc = train(model, device, train_loader, optimizer, epoch)
    test_loss, test_acc = test(model, device, test_loader, epoch)
    scheduler.step()
    history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc,
                        test_loss=test_loss, test_acc=test_acc, lr=lr,
                        seconds=time.perf_counter() - start))
    save_checkpoint(CHECKPOINT, model, optimizer, scheduler, train_loader, recipe, history)
print(f"final test accuracy: {history[-1]['test_acc']:.2f}% at epoch {len(history)}")

# %%
finished = IMAGES is not None and len(history) == recipe["epochs"]
figures = IMAGES if finished else None  # a half-trained model never replaces images/
if IMAGES is not None and not finished:
    print(f"the run is incomplete ({len(history)} of {recipe['epochs']} epochs): its figures "
          f"are drawn here, not saved in {IMAGES}/; run the training cell again to finish it")
loss_fig, accuracy_fig = plot_history(history, save_dir=figures)
if figures:
    samples_fig.savefig(f"{figures}/samples.png", dpi=120)  # the Data section's grid

# %% [markdown]
# ## What the model gets wrong

# %%
analysis = plot_mistakes(model, test_loader, device, save_dir=figures)

# %% [markdown]
# ## What each part buys
# `benchmarks/ablation.py` trains the recipe again with one ingredient changed at a time: no
# BatchNorm, no dropout, no augmentation, rotation only, crop-resize only, a constant learning
# rate, bare 1x1 transitions, dropout after every 3x3 block, a global-average-pooling head
# (`--head gap`, the form that passes every one of the course's checks), and the table's
# channels scaled to about 3/4, 1/2 and 1/3 of its parameters (`--width 0.85`, `0.7`, `0.55`);
# 20 epochs and several seeds each. The second figure sets them beside another design, the
# compact model (`python train.py --model compact`: 7,594 parameters, every course check, 15
# epochs; docs/compact.md). Nothing is retrained here: these are the figures
# `python benchmarks/ablation.py --report` draws from `results/` (the tables are in the README
# and docs/experiments.md; in Colab, open them from the `images/` folder).
#
# ![Final test accuracy of each ablation variant, a dot per seed and a bar at their mean, against the dashed 99.4% target](images/ablation.png)
#
# ![Final test accuracy against parameters (log scale) for the recipe, its narrower widths, the GAP head and the compact model, a dot per seed, with published single runs by others and the 99.4% target](images/parameters.png)
