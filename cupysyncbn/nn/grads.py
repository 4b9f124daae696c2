"""Data-parallel gradient averaging for users without a framework wrapper.

Batch-norm parameter gradients are local (as in Paddle and PyTorch); a
data-parallel job averages them across ranks. :func:`allreduce_gradients`
does that for every trainable parameter of a model in ONE packed collective.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import get_backend
from ..comm.select import as_communicator
from .layer import Layer, Parameter

__all__ = ["allreduce_gradients"]


def allreduce_gradients(
    params: Layer | list[Parameter], comm: Any = None, average: bool = True
) -> None:
    """Sum (or average) the gradients of trainable parameters over ``comm``.

    Parameters
    ----------
    params : Layer or list of Parameter
        A model (all its trainable parameters) or an explicit list. Every rank
        must pass the same structure.
    comm : Communicator, mpi4py.MPI.Comm or None
        Group (None: the default communicator).
    average : bool
        Divide by the group size (the usual data-parallel average).

    Notes
    -----
    A parameter whose ``grad`` is None contributes zeros and receives the
    group's result, so ranks with and without gradients stay in step.
    """
    plist = params.parameters() if isinstance(params, Layer) else list(params)
    plist = [p for p in plist if p.trainable]
    comm_ = as_communicator(comm)
    if not plist or comm_.size == 1:
        return
    backend = get_backend(plist[0].data, "parameter")
    xp = backend.xp
    sizes = [int(np.prod(p.data.shape)) for p in plist]
    buf = xp.zeros(sum(sizes), dtype=np.float64)
    off = 0
    for p, n in zip(plist, sizes):
        if p.grad is not None:
            buf[off : off + n] = p.grad.reshape(-1)
        off += n
    comm_.allreduce_sum(buf)
    if average:
        buf /= comm_.size
    off = 0
    for p, n in zip(plist, sizes):
        p.grad = buf[off : off + n].reshape(p.data.shape).astype(p.data.dtype)
        off += n
