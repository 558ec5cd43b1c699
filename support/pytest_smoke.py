"""A pytest plugin (pyproject's addopts loads it with -p): the notebook, run by nbval in a
kernel that inherits this environment, trains 1 epoch on a small subset unless a full run is
asked for explicitly (S6_SMOKE=0). Loaded by -p rather than from a conftest.py, so that
`pytest Session_6_Solution.ipynb` alone gets it too, with no conftest at the top level.
"""

import os

os.environ.setdefault("S6_SMOKE", "1")
