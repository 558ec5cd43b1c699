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
# This notebook trains the S6 network, a CNN of 19,200 parameters built as the write-up's
# table, to 99.4%+ on MNIST's test set in 20 epochs: the data, the model, SGD with StepLR
# and the epoch loop, in view. The network is in `model.py`; the loaders, `train`, `test`
# and the plots in `utils.py`.
#
# Every epoch is saved in `CHECKPOINT` (the settings cell): run the training cell again after
# an interruption and it goes on from the last saved epoch; a finished run is loaded, not
# trained again.

# %%
# Colab: when the repository's files are not next to this notebook, fetch them.
import importlib.util
import os
import subprocess
import sys

REPO = "your-github-user/s6-mnist"  # publishers: see docs/publishing.md; the badges use it too
if importlib.util.find_spec("model") is None:
    if REPO.startswith("your-github-user/"):
        print("model.py and utils.py are not beside this notebook: set REPO above to the "
              "GitHub repository that holds them, or upload the repository's files, then run "
              "this cell again.")
    else:
        if not os.path.exists("s6-mnist"):
            cloned = subprocess.run(["git", "clone", "--depth", "1",
                                     f"https://github.com/{REPO}.git", "s6-mnist"],
                                    capture_output=True, text=True)
            if cloned.returncode != 0:
                print(f"could not clone https://github.com/{REPO}: "
                      f"{(cloned.stderr.strip().splitlines() or ['git failed'])[-1]}")
        if os.path.exists("s6-mnist"):
            os.chdir("s6-mnist")
            sys.path.insert(0, os.getcwd())
if importlib.util.find_spec("torchsummary") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "torchsummary"])

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from torchsummary import summary

from model import Net, count_parameters, format_layer_table, layer_table
from utils import (
    RECIPE,
    Run,
    augmented_samples,
    describe_device,
    device_loader,
    ensure_mnist,
    figures_dir,
    final_line,
    format_recipe,
    get_device,
    image_grid,
    make_loaders,
    net_options,
    plot_history,
    prepare_model,
    read_ablation,
    resume_or_start,
    save_analysis,
    save_epoch,
    save_figure,
    show,
    smoke_mode,
    test,
    train,
)

SMOKE = smoke_mode(os.environ.get("S6_SMOKE"))  # "1": 1 epoch on 2,048 images (the tests)
# Every epoch is saved here. In Colab, mount Google Drive and save there, so that a lost runtime
# does not lose the run: e.g. "/content/drive/MyDrive/s6/notebook.pt".
CHECKPOINT = "checkpoints/notebook.pt"
RETRAIN = False  # True: train from scratch even when CHECKPOINT holds a finished run
IMAGES = "images"  # a complete run's figures go here (the README shows them)
DATA = "data"  # MNIST's files, fetched on first use
recipe = dict(RECIPE)  # the write-up's settings; docs/experiments.md lists the switches
if SMOKE:  # a quick check: it must not touch a full run's checkpoint or figures
    recipe.update(epochs=1, limit_train=2048, limit_test=1000)
    CHECKPOINT, RETRAIN, IMAGES = "checkpoints/notebook-smoke.pt", True, None
plt.rcParams["figure.dpi"] = 80  # inline figures only (images/ is saved at 120 dpi): a lighter notebook
device = get_device()
print(describe_device(device))
print("recipe:")
print(format_recipe(recipe))

# %% [markdown]
# ## Data
# Below: a training batch as the model sees it, after the random crop-resize (10% of images)
# and rotation (±15°). `ensure_mnist` fetches MNIST into `data/` the first time, each file
# checked against its published MD5.

# %%
ensure_mnist(DATA)
samples = device_loader(DATA, train=True, batch_size=24, device=device, seed=0)
x, y = augmented_samples(samples)
samples_fig = image_grid(x, [f"label {int(v)}" for v in y],
                         suptitle="Augmented training samples")
show(samples_fig, "24 augmented training digits, 8 to a row, each captioned with its label")

# %% [markdown]
# ## The network
# `Net` in `model.py` is the write-up's table, one line per row. The parameter count and the
# receptive-field table below are computed from the model itself.

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
# The model, SGD (lr 0.01, momentum 0.9) and StepLR (step 15, gamma 0.1) are built from the
# recipe, then the loop runs `train` and `test` (in `utils.py`) once per epoch, steps the
# schedule and saves the epoch. `prepare_model` moves the model to the device; with the fast
# loader it also swaps each ReLU + Dropout for one fused module (same function, same weights).
#
# Interrupted (a time-out, a closed tab, the stop button)? Run this cell again: it goes on
# from the last saved epoch. A finished run is loaded rather than trained again; to train it
# again set `RETRAIN = True` (or delete the file). A checkpoint of another recipe is not
# resumed: the cell says what differs. The cells below save their figures in `images/` only
# when the run has all its epochs.

# %%
torch.manual_seed(recipe["seed"])  # the same initial weights each time this cell runs
model = prepare_model(Net(**net_options(recipe)), recipe, device)
optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe["step_size"],
                                            gamma=recipe["gamma"])
train_loader, test_loader = make_loaders(recipe, DATA, device)
run = Run(recipe, model, optimizer, scheduler, train_loader, test_loader)  # what a save holds

with resume_or_start(run, CHECKPOINT, retrain=RETRAIN) as first_epoch:  # 1, or after the saved
    for epoch in range(first_epoch, recipe["epochs"] + 1):
        train_loss, train_acc = train(model, device, train_loader, optimizer, epoch)
        test_loss, test_acc = test(model, device, test_loader, epoch)
        scheduler.step()
        save_epoch(run, CHECKPOINT, train_loss, train_acc, test_loss, test_acc)
print(final_line(run.history))

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
# 20 epochs and several seeds each. The second table and figure set them beside another
# design, the compact model (`python train.py --model compact`: 7,594 parameters, every course
# check, 15 epochs; docs/compact.md). This cell retrains none of them: it reads their results
# from `results/` (docs/experiments.md).

# %%
ablation = read_ablation("results/ablation", save_dir=figures)
if ablation:
    display(Markdown(ablation["table"]))
    show(ablation["accuracy"], "Final test accuracy of each ablation variant, a dot per seed and "
         "a bar at their mean, against the dashed 99.4% target")
    display(Markdown(ablation["parameters_table"]))
    show(ablation["parameters"], "Final test accuracy against parameters (log scale) for the "
         "recipe, its narrower widths, the GAP head and the compact model, a dot per seed, with "
         "published single runs by others and the 99.4% target")
else:
    print("No ablation results in results/ablation/ yet: run "
          "`python benchmarks/ablation.py --seeds 1 2 3`, then this cell again.")
