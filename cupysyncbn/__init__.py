"""cupysyncbn: exact synchronized batch normalization for NumPy and CuPy arrays.

Layers follow ``paddle.nn.SyncBatchNorm`` (arguments, parameter names, momentum
convention); statistics are merged exactly across ranks with uneven or empty
batches, over MPI (NumPy arrays) or NCCL (CuPy arrays) with one all-reduce per
pass. See README.md and docs/ (conventions, design, GPUs, failure behaviour).

The package, by layer (docs/design.md has the map): :mod:`.nn` (layers) over
:mod:`.functional` (the pure functions) over the private engine ``_sync``
over :mod:`.backends` (communication-free primitives) and :mod:`.comm`
(communicators); :mod:`.arrays` and :mod:`.runtime` (environment, placement,
watchdog) underneath; :mod:`.interop` adapters beside :mod:`.nn`.
"""

from . import _deprecated, functional
from ._sync.device_status import check_errors
from .checkpoint import load, save
from .comm import Communicator, get_default_comm, init, set_default_comm
from .consistency import check_consistency, state_digest
from .errors import (
    CollectiveMismatchError,
    CommunicatorError,
    NoPendingForwardError,
    RemoteInputError,
    SyncBatchNormError,
)
from .modes import is_grad_enabled, local_eval, no_grad
from .nn.container import LayerList, Sequential
from .nn.grads import allreduce_gradients, global_batch_size
from .nn.layer import Layer, ParamAttr, Parameter
from .nn.norm import BatchNorm1D, BatchNorm2D, BatchNorm3D, SyncBatchNorm
from .runtime.placement import get_device, set_device
from .runtime.watchdog import install_abort_hook, uninstall_abort_hook

__version__ = "0.1.0"

__all__ = [
    "SyncBatchNorm",
    "BatchNorm1D",
    "BatchNorm2D",
    "BatchNorm3D",
    "Layer",
    "Sequential",
    "LayerList",
    "Parameter",
    "ParamAttr",
    "no_grad",
    "local_eval",
    "is_grad_enabled",
    "NoPendingForwardError",
    "Communicator",
    "init",
    "set_device",
    "get_device",
    "get_default_comm",
    "set_default_comm",
    "allreduce_gradients",
    "global_batch_size",
    "check_errors",
    "install_abort_hook",
    "check_consistency",
    "state_digest",
    "uninstall_abort_hook",
    "save",
    "load",
    "functional",
    "SyncBatchNormError",
    "CollectiveMismatchError",
    "RemoteInputError",
    "CommunicatorError",
    "__version__",
]

_deprecated.install()
__getattr__ = _deprecated.submodule_getattr(__name__)  # old module paths, one release
