"""What makes the lesson trustworthy and fast, kept out of its way.

The learner reads the notebook, model.py, utils.py and train.py; these modules stand behind
them, one concern each:

    augment      the whole-batch crop-resize and rotation, pixel for pixel torchvision's
    boundary     train.py's error boundary: each early end is one line and an exit code
    checkpoints  what a checkpoint holds, the atomic save, the lock, the checked load
    devices      what differs between the CPU, CUDA and MPS, and the fast path's settings
    failures     which failures a user can cause or meet, in one line each
    figures      how a figure is drawn, saved and shown, and where a run's figures go
    flag_checks  the checks of train.py's flags and paths, before any work starts
    flag_types   the value types of train.py's flags, and their limits
    locks        one process at a time on a file
    metrics      the JSON file a run leaves for the benchmarks
    mnist_files  the four MNIST files: found, downloaded or rebuilt from PyPI, each checked
    outputs      which files a run may write or replace
    startup      Ctrl-C while train.py loads torch: noted, then a one-line stop
    stopping     how train.py stops early (signals, errors) and what it says then
"""
