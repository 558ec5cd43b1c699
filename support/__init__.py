"""What makes the lesson trustworthy and fast, kept out of its way.

The learner reads the notebook, model.py, utils.py and train.py; these modules stand behind
them, one concern each:

    augment        the whole-batch crop-resize and rotation, pixel for pixel torchvision's
    bookkeeping    what the loop keeps out of sight: bars, on-device sums, NaN checks, history
    boundary       train.py's error boundary: each early end is one line and an exit code
    checkpoints    the atomic write, the checked read, the lock, the notebook's resume
    checkpoint_checks  every part of a read checkpoint, and a cell's objects, against the recipe
    devices        what differs between the CPU, CUDA and MPS; train.py's process settings
    failures       which failures a user can cause or meet, in one line each
    fast_loader    MNIST held on the device, each batch augmented and normalised there
    figures        the lesson's figures (loss, accuracy, mistakes); how every figure is drawn
    flag_checks    the checks of train.py's flags and paths, before any work starts
    flag_types     the value types of train.py's flags, and their limits
    fused_dropout  the fast path's ReLU + dropout in one module, fused into a built Net
    locks          one process at a time on a file
    metrics        the JSON file a run leaves for the benchmarks
    mnist_files    the four MNIST files: found, downloaded or rebuilt from PyPI, each checked
    outputs        which files a run may write or replace
    pytest_smoke   the test suite runs the notebook in its 1-epoch smoke mode
    recipe         the recipe: the write-up's settings, this project's switches, their checks
    startup        Ctrl-C while train.py loads torch: noted, then a one-line stop
    stopping       how train.py stops early (signals, errors) and what it says then
    torchvision_loader  the original per-image pipeline (--loader torchvision)
    workers        DataLoader workers leave Ctrl-C to the main process
"""
