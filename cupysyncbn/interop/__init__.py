"""Interoperability with other frameworks.

- :mod:`cupysyncbn.interop.dlpack`: any ``__dlpack__`` array in the functional
  API, outputs in the caller's library, zero-copy.
- :mod:`cupysyncbn.interop.state_dict`: Paddle <-> PyTorch state-dict names and
  the momentum / running-variance conventions.
- :mod:`cupysyncbn.interop.torch`: a ``torch.nn.Module`` SyncBatchNorm with
  PyTorch's conventions and ``convert_sync_batchnorm``. It is the only module of
  the package that imports ``torch``; import it explicitly
  (``import cupysyncbn.interop.torch``), this package does not.
"""

from __future__ import annotations

from . import dlpack, state_dict

__all__ = ["dlpack", "state_dict"]
