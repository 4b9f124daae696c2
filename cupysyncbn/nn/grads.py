"""Data-parallel gradients for users without a framework wrapper.

Batch-norm parameter gradients are local (as in Paddle and PyTorch); a
data-parallel job sums or averages them across ranks. :func:`allreduce_gradients`
does that for every trainable parameter of a model in ONE packed collective;
:func:`global_batch_size` gives the loss scale that makes the result exact
when ranks hold different numbers of samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import get_backend
from ..comm.select import as_communicator
from .layer import Layer, Parameter

__all__ = ["allreduce_gradients", "global_batch_size"]


def global_batch_size(n_local: int, comm: Any = None) -> int:
    """The number of samples in the global batch: ``n_local`` summed over ``comm``.

    The loss scale for uneven batches: with ``N = global_batch_size(n)``, each
    rank takes the SUM of its per-sample losses divided by ``N`` and sums the
    gradients with ``allreduce_gradients(model, average=False)``; the result is
    the gradient of the global batch's mean loss, exactly as one process on
    the whole batch computes it. (The data-parallel habit, each rank's mean
    loss and then averaged gradients, weights a sample on a rank with fewer
    samples more: biased whenever the batches are uneven.)

    Parameters
    ----------
    n_local : int
        Samples this rank holds (0 is fine: the rank still takes part).
    comm : Communicator, mpi4py.MPI.Comm or None
        Group (None: the default communicator). One small all-reduce;
        collective over the group.

    Returns
    -------
    int

    Raises
    ------
    TypeError, ValueError
        For an ``n_local`` that is not an integer >= 0.
    """
    if isinstance(n_local, bool) or not isinstance(n_local, (int, np.integer)):
        raise TypeError(f"n_local must be an int >= 0; got {n_local!r}")
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0; got {n_local}")
    comm_ = as_communicator(comm)
    if comm_.size == 1 and not comm_.force_collectives:
        return int(n_local)
    return int(round(float(comm_.allreduce_host(np.array([float(n_local)]))[0])))


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

    Parameters of layers built with ``reproducible=True`` receive the global
    gradient those layers summed exactly in their backward (the same bits
    for every number of ranks and split of the batch) when every rank still
    holds it (:meth:`Parameter.global_grad`); otherwise the plain sum.
    """
    plist = params.parameters() if isinstance(params, Layer) else list(params)
    plist = [p for p in plist if p.trainable]
    comm_ = as_communicator(comm)
    if not plist or comm_.size == 1:
        return
    backend = get_backend(plist[0].data, "parameter")
    xp = backend.xp
    sizes = [int(np.prod(p.data.shape)) for p in plist]
    total = sum(sizes)
    # one slot per parameter after the gradients: 1 where this rank holds
    # the layer's exact global gradient (used only where every rank does)
    buf = xp.zeros(total + len(plist), dtype=np.float64)
    held = [p.global_grad() for p in plist]
    off = 0
    for i, (p, n) in enumerate(zip(plist, sizes)):
        if p.grad is not None:
            buf[off : off + n] = p.grad.reshape(-1)
        buf[total + i] = held[i] is not None
        off += n
    comm_.allreduce_sum(buf)
    flags = backend.to_host(buf[total:])
    off = 0
    for g, n, f in zip(held, sizes, flags):
        if f == comm_.size and g is not None:
            buf[off : off + n] = g.reshape(-1)
        off += n
    buf = buf[:total]
    if average:
        buf /= comm_.size
    off = 0
    for p, n in zip(plist, sizes):
        p.grad = buf[off : off + n].reshape(p.data.shape).astype(p.data.dtype)
        off += n
