"""The main job: ``mpiexec -n K python -m cupysyncbn.demo --out DIR``.

* :mod:`.run`: the job (``main``): local BN, SyncBN and one process trained in
  lock step and compared;
* :mod:`.model`: the small network, its data and optimizer;
* :mod:`.plot`: the figure.
"""

from __future__ import annotations

from .run import main

__all__ = ["main"]
