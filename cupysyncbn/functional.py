"""Synchronized batch normalization as pure functions of arrays: the public functional API.

The layers in :mod:`cupysyncbn.nn` hold state and call these functions;
adapters and pipelines call them directly. Nothing here mutates its inputs:
the forward returns the new running statistics and the caller decides to
store them. Each function checks its arguments once (:mod:`._sync.checks`)
and dispatches to the synchronized-pass engine: the fused kernels
(:mod:`._sync.fused`, CuPy) or the four backend primitives
(:mod:`._sync.passes`, NumPy and numba), which also explains the merge.

A training forward is one all-reduce (after a layer's first pass), a training
backward one all-reduce, eval passes none; see docs/design.md.
"""

from __future__ import annotations

from typing import Any

from ._sync import checks, collective, exact, fused, passes
from ._sync.state import ForwardContext, ForwardResult, SyncState
from .arrays.dlpack import accepts_dlpack
from .arrays.dtypes import native_byteorder
from .arrays.formats import canonical_view
from .backends import get_backend
from .comm.select import as_communicator

__all__ = [
    "SyncState",
    "ForwardContext",
    "ForwardResult",
    "batch_norm_forward",
    "batch_norm_backward",
    "running_stats_update",
    "fail_collectively",
]


def running_stats_update(
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    count: int,
    momentum: float | None,
    unbiased_running_var: bool = False,
    num_batches_tracked: int = 0,
) -> tuple[Any, Any]:
    """New running statistics (Paddle convention), as new arrays.

    ``new = old * momentum + batch * (1 - momentum)``; ``momentum=None`` gives
    the cumulative average over ``num_batches_tracked + 1`` batches. With
    ``unbiased_running_var`` the variance stored is ``var * m / (m - 1)``.

    Raises
    ------
    ValueError
        ``unbiased_running_var`` with a global ``count`` of 1.
    """
    backend: Any = get_backend(running_mean, "running_mean")  # every backend has the channel math
    return backend.running_update(
        running_mean, running_var, batch_mean, batch_var, count, momentum,
        unbiased_running_var, num_batches_tracked,
    )


@accepts_dlpack("x", "weight", "bias", "running_mean", "running_var")
@passes.quiet_fp
def batch_norm_forward(
    x: Any,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    *,
    training: bool = True,
    momentum: float | None = 0.9,
    epsilon: float = 1e-5,
    data_format: str = "NCHW",
    comm: Any = None,
    unbiased_running_var: bool = False,
    num_batches_tracked: int = 0,
    sync_state: SyncState | None = None,
    param_dtype: Any = None,
    inplace_running_stats: bool = False,
    reproducible: bool | None = None,
    act: str | None = None,
) -> ForwardResult:
    """Synchronized batch-norm forward.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        Local part of the global batch, in ``data_format``. May be empty along
        the batch axis; may be non-contiguous.
        Any array implementing ``__dlpack__`` (PyTorch, JAX, ...) is accepted
        too, zero-copy; the outputs are then arrays of ``x``'s library
        (:mod:`cupysyncbn.arrays.dlpack`).
    weight, bias : array of shape (C,), optional
        Affine parameters; ``None`` means weight 1 / bias 0.
    running_mean, running_var : array of shape (C,), optional
        Running statistics. Used for normalization when ``training`` is False;
        updated (returned as new arrays) when ``training`` is True.
    training : bool
        Batch statistics (synchronized) when True, or when no running
        statistics are given; running statistics otherwise.
    momentum : float or None
        Paddle convention: ``new = old * momentum + batch * (1 - momentum)``.
        ``None`` means a cumulative average over ``num_batches_tracked + 1``.
    epsilon : float
        Added to the variance.
    data_format : str
        ``NC, NCL, NCHW, NCDHW, NLC, NHWC, NDHWC``.
    comm : Communicator, mpi4py.MPI.Comm or None
        Group to synchronize over; ``None`` is the default communicator
        (:func:`cupysyncbn.init`), which is one process unless launched by
        ``mpiexec``.
    unbiased_running_var : bool
        Store ``var * m/(m-1)`` in the running variance (PyTorch convention).
    num_batches_tracked : int
        Batches seen so far (for ``momentum=None``).
    sync_state : SyncState, optional
        Makes the steady state one all-reduce per pass (see :mod:`._sync.passes`).
    param_dtype : dtype, optional
        Dtype of the layer (float64 switches the math to float64). Defaults to
        the dtype of ``weight``/``running_mean`` or float32.
    inplace_running_stats : bool
        On the fused GPU path, update ``running_mean``/``running_var`` in place
        (what a layer wants: no allocation, CUDA-graph safe) instead of
        returning new arrays.
    reproducible : bool or None
        Bitwise-reproducible mode (docs/reproducibility.md): the outputs, the
        statistics and the input gradients of the backward are the same bits
        for every number of ranks and every split of the global batch. None:
        ``CUPYSYNCBN_REPRODUCIBLE`` (default False). A ``sync_state`` keeps the
        mode of its first synchronized pass; with None, a ``sync_state`` whose
        ``reproducible`` a layer set gives the mode. Not with ``act``.
    act : {None, 'relu'}
        ``'relu'``: ``y = max(bn(x), 0)`` written by the normalize pass itself
        (no pass over ``y`` of its own); :func:`batch_norm_backward` then
        applies the ReLU's mask inside its own passes (recomputed from ``x``:
        nothing more is saved). Eval passes apply it too.

    Returns
    -------
    ForwardResult

    Raises
    ------
    ValueError, TypeError
        For invalid inputs, naming the argument (on every rank of the group:
        the faulty rank raises the specific error, the others
        :class:`~cupysyncbn.errors.RemoteInputError`).
    """
    comm_ = as_communicator(comm)
    x, weight, bias, running_mean, running_var = map(
        native_byteorder, (x, weight, bias, running_mean, running_var)
    )
    vectors = (weight, bias, running_mean, running_var)
    batch_stats = training or running_mean is None
    sync = batch_stats and comm_.synchronizes
    repro, sync_state = _reproducible_state(reproducible, comm_, sync_state, sync)
    vd = checks.check_forward(
        comm_, sync_state, x, data_format, momentum, epsilon, vectors, param_dtype,
        batch_stats, sync, act,
    )
    v = canonical_view(vd.backend.ascontiguous(x), vd.fmt)
    relu = act == "relu"
    if repro:
        if relu:
            raise ValueError(checks.REPRO_ACT)
        # Before any collective of the pass, on every rank alike (the backend
        # is the layer's): no silent fall-back to the default mode's math.
        exact.ops_of(vd.backend)
        return passes.forward(
            comm_, sync_state, x, v, vd, vectors, training, batch_stats, momentum, epsilon,
            unbiased_running_var, num_batches_tracked, sync, reproducible=True,
        )
    if fused.applies(vd.backend, vd.param_dtype, *vectors):
        return fused.run_forward(
            comm_, sync_state, x, v, vd, vectors, training, batch_stats, momentum, epsilon,
            unbiased_running_var, num_batches_tracked, sync, inplace_running_stats, relu,
        )
    return passes.forward(
        comm_, sync_state, x, v, vd, vectors, training, batch_stats, momentum, epsilon,
        unbiased_running_var, num_batches_tracked, sync, relu,
    )


def _reproducible_state(
    reproducible: Any, comm: Any, state: SyncState | None, sync: bool,
) -> tuple[bool, SyncState | None]:
    """The pass's mode, and the state that carries it to the error paths.

    A synchronized reproducible pass without a state gets a fresh one, so a
    rank whose input fails the checks joins the peers' bound pass (a MAX
    all-reduce) rather than a SUM. A state keeps the mode of its first
    synchronized pass (its identity in the handshake).
    """
    if reproducible is None and state is not None and state.reproducible is not None:
        repro = bool(state.reproducible)  # the layer's setting (the adapters set it)
    else:
        try:
            repro = checks.check_reproducible(reproducible)
        except (TypeError, ValueError) as e:
            collective.fail_collectively(e, "argument", comm, state, None, None)
            raise  # pragma: no cover - fail_collectively raised
    if state is None:
        return repro, SyncState(reproducible=True) if (repro and sync) else None
    if state.handshake_done and bool(state.reproducible) != repro:
        err = ValueError(
            f"reproducible={repro} but this layer's synchronized passes ran with"
            f" reproducible={state.reproducible}; the mode is fixed at the first pass"
        )
        collective.fail_collectively(err, "argument", comm, state, None, None)
    state.reproducible = repro
    return repro, state


@accepts_dlpack("dy")
@passes.quiet_fp
def batch_norm_backward(
    dy: Any, ctx: ForwardContext, *, need_param_grads: bool = True,
    accumulate_into: tuple | None = None,
) -> tuple[Any, Any, Any]:
    """Synchronized batch-norm backward.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to the forward's output: same shape
        and dtype as the forward input.
    ctx : ForwardContext
        From :func:`batch_norm_forward` (``result.ctx``).
    need_param_grads : bool
        Compute ``dweight``/``dbias`` (else they are None).
    accumulate_into : (array, array), optional
        Gradient accumulators ``(weight_grad, bias_grad)`` of the parameter
        dtype. Where the pass can (the fused GPU path), it adds the local
        gradients to them in place (no temporaries: CUDA-graph safe) and
        returns these same arrays as ``dweight, dbias``; otherwise it ignores
        them and returns new arrays, so callers test ``dweight is grad``.

    Returns
    -------
    dx : array
        Same shape and dtype as the forward input.
    dweight, dbias : array of shape (C,) in the parameter dtype, or None
        Gradients over the LOCAL batch (average them across ranks with
        :func:`cupysyncbn.allreduce_gradients` when you have no data-parallel
        wrapper).

    Notes
    -----
    Training mode (batch statistics)::

        dx = w * invstd * (dy - sum(dy)/m - xhat * sum(dy * xhat)/m)

    with both sums all-reduced over the group in one collective. Eval mode
    (running statistics): ``dx = dy * w * invstd``, no communication. After a
    forward with ``act='relu'``, ``dy`` is zeroed where the forward's output
    is 0 before both (the sums and ``dweight``/``dbias`` included), inside
    the same passes.
    """
    nf = ctx.mean.shape[0]
    dy = native_byteorder(dy)
    sync = ctx.batch_stats and ctx.comm.synchronizes
    checks.check_backward(dy, ctx, nf, sync)
    dyv = canonical_view(ctx.backend.ascontiguous(dy), ctx.fmt)
    if ctx.fused is not None:
        return fused.run_backward(dy, dyv, ctx, nf, sync, need_param_grads, accumulate_into)
    return passes.backward(dyv, ctx, nf, sync, need_param_grads)


def fail_collectively(
    error: BaseException,
    kind: str = "other",
    *,
    comm: Any = None,
    sync_state: SyncState | None = None,
    num_features: int | None = None,
    backend: str | None = None,
) -> None:
    """Join the training forward the other ranks are in, then raise ``error``.

    For adapters and wrappers whose own checks fail before they call
    :func:`batch_norm_forward` (a tensor of the wrong rank, an object that is
    not a tensor): instead of leaving the other ranks waiting in the
    collective, this rank takes part with an error slot set, so every rank
    raises — this one ``error``, the others
    :class:`~cupysyncbn.errors.RemoteInputError` naming ``kind``.

    Parameters
    ----------
    error : BaseException
        Raised on this rank.
    kind : str
        One of :data:`cupysyncbn._sync.protocol.ERROR_KINDS`.
    comm, sync_state, num_features
        What the layer would have passed to :func:`batch_norm_forward`.
    backend : {'numpy', 'cupy'}, optional
        Where the layer's buffers live (default: from ``sync_state``/``comm``).
    """
    collective.fail_collectively(
        error, kind, as_communicator(comm), sync_state, num_features, backend
    )
