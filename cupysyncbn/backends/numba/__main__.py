"""``python -m cupysyncbn.backends.numba``: compile every kernel once, into numba's disk cache."""

import sys
import time

from .backend import warm_up

t0 = time.perf_counter()
n = warm_up()
print(f"cupysyncbn: {n} numba kernel signatures compiled or loaded from the cache"
      f" in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
