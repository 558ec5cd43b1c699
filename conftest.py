"""pytest set-up for the whole repository (the tests/ folder has its own fixtures).

The notebook, run by nbval in a kernel that inherits this environment, trains 1 epoch on a
small subset unless a full run is asked for explicitly (S6_SMOKE=0).
"""

import os

os.environ.setdefault("S6_SMOKE", "1")
