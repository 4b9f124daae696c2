"""cupysyncbn: exact synchronized batch normalization for NumPy and CuPy arrays.

Layers follow ``paddle.nn.SyncBatchNorm`` (arguments, parameter names, momentum
convention); statistics are merged exactly across ranks with uneven or empty
batches, over MPI (NumPy arrays) or NCCL (CuPy arrays) with one all-reduce per
pass. See README.md and docs/ (conventions, design, GPUs, failure behaviour).
"""

from __future__ import annotations

from . import functional
from .comm import Communicator, get_default_comm, init, set_default_comm
from .consistency import check_consistency, state_digest
from .container import LayerList, Sequential
from .deferred import check_errors
from .errors import (
    CollectiveMismatchError,
    CommunicatorError,
    RemoteInputError,
    SyncBatchNormError,
)
from .fault import install_abort_hook, uninstall_abort_hook
from .grads import allreduce_gradients
from .io import load, save
from .layer import Layer, NoPendingForwardError, ParamAttr, Parameter, is_grad_enabled, no_grad
from .norm import BatchNorm1D, BatchNorm2D, BatchNorm3D, SyncBatchNorm
from .placement import get_device, set_device
from .protocol import local_eval

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
