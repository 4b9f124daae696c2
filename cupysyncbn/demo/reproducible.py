"""``python -m cupysyncbn.demo --reproducible``: SyncBN against one process, bit for bit.

With ``reproducible=True`` batch norm gives the same bits for every split of
the global batch (docs/reproducibility.md). For a whole network to train
bit for bit like one process, its other layers must too; the demo's are
made so here:

* the loss of every run is scaled by the global batch size (the exact rule
  of :func:`cupysyncbn.global_batch_size`), not by each rank's;
* the 1x1 convolution and the linear layers compute one sample at a time
  (``per_sample``) and keep each sample's parameter gradients, which
  :func:`sample_sum` adds up exactly over the samples of every rank with the
  reproducible mode's primitives (:mod:`cupysyncbn.backends.exact_sums`:
  a MAX all-reduce of the bounds, a SUM all-reduce of the folds);
* the batch-norm parameters' gradients come from
  ``allreduce_gradients(..., average=False)``, which hands out the layers'
  exact global sums.

The SyncBN run and the one-process run then take the same steps: their
outputs, parameters and running statistics are compared byte for byte after
every step, and the first step where any rank sees a difference is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends import exact_sums as xs
from ..comm.base import Communicator
from ..nn.grads import allreduce_gradients
from ..nn.norm import BatchNorm1D, BatchNorm2D, SyncBatchNorm

__all__ = ["sample_sum", "step_grads", "same_bits"]

_F64 = np.dtype(np.float64)


def sample_sum(per_sample: Any, comm: Communicator) -> np.ndarray:
    """The exact sum over the samples of every rank of ``per_sample`` (``(n, ...)``), float64.

    Each entry of a sample is a "channel" of the reproducible mode's folds:
    the sum is rounded once, from its exact value, so it is the same bits
    for every split of the samples over the ranks.
    """
    v = np.ascontiguousarray(per_sample, dtype=_F64).reshape(per_sample.shape[0], -1)
    n, c = v.shape
    k = xs.folds_for(_F64)
    e = xs.bound_exponent(xs.absmax(v, True) if n else None, c)
    if comm.size > 1:
        e = comm.allreduce_max(e)
    folds, _ = xs.moment_folds(v, True, xs.scale_exponent(e), k)
    if comm.size > 1:
        folds = comm.allreduce_sum(folds.reshape(-1)).reshape(k, c)
    return xs.finalize_sum(folds, e).reshape(per_sample.shape[1:])


def step_grads(model: Any, comm: Communicator) -> None:
    """Every parameter gradient of ``model`` for this step, the same bits for every split."""
    bn = []
    for layer in model.sublayers():
        for param, per_sample in getattr(layer, "samples", ()):
            param.grad = sample_sum(per_sample, comm).astype(param.data.dtype)
        layer.samples = ()
        if isinstance(layer, (BatchNorm1D, BatchNorm2D, SyncBatchNorm)):
            bn += [p for p in (layer.weight, layer.bias) if p.trainable]
    if comm.size > 1:
        allreduce_gradients(bn, comm, average=False)  # the layers' exact global sums


def same_bits(a: Any, b: Any) -> bool:
    """Whether two state dicts (or arrays) hold the same bytes."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    return bool(a.dtype == b.dtype and a.shape == b.shape
                and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
