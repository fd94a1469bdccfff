"""``jupyter_swapserve.client`` is :mod:`jupyter_swapserve.kernel.client` (kernel-side code lives in
``kernel/``); this name is kept for notebooks and scripts that import it."""

from __future__ import annotations

import sys

from .kernel import client

# the same module object under both names, so attributes set through one are seen through the other
sys.modules[__name__] = client
