"""Interoperability with other frameworks.

- :mod:`cupysyncbn.interop.state_dict`: Paddle <-> PyTorch state-dict names and
  the momentum / running-variance conventions.
- :mod:`cupysyncbn.interop.torch`: a ``torch.nn.Module`` SyncBatchNorm with
  PyTorch's conventions and ``convert_sync_batchnorm``. It is the only module of
  the package that imports ``torch``; import it explicitly
  (``import cupysyncbn.interop.torch``), this package does not.
- :mod:`cupysyncbn.interop.paddle`: the same for PaddlePaddle (imports ``paddle``).
- :mod:`cupysyncbn.interop.shared_comm`: how the adapters' layers hold their
  communicator (shared by deepcopy, dropped by pickling).

Any ``__dlpack__`` array goes into the functional API through
:mod:`cupysyncbn.arrays.dlpack`.
"""

from __future__ import annotations

from .. import _deprecated
from . import state_dict

__all__ = ["state_dict"]


__getattr__ = _deprecated.submodule_getattr(__name__)  # old module paths, one release
