"""The contract every array backend implements.

A backend owns the five numeric primitives of batch normalization (the split
PyTorch's ``Normalization.cuh`` uses), on the two canonical layouts of
:mod:`cupysyncbn.arrays.formats`:

``(N, C, S)`` channel-first (``channel_last=False``) and ``(M, C)``
channel-last (``channel_last=True``).

1. ``moments``          local per-channel mean and M2 (sum of squared
                        deviations from the local mean), float64, stable;
2. (merge)              done by the engine (:mod:`cupysyncbn._sync.passes`) on C-sized arrays;
3. ``normalize``        ``y = (x - mean) * scale + bias``;
4. ``backward_reduce``  local ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd``;
5. ``backward_elemt``   ``dx = a * (dy - mean_dy) - b * (x - mean)``.

The fused ReLU (``act="relu"``): ``normalize(..., relu=True)`` writes
``max(y, 0)`` (NaN kept) in the same pass, and the two backward primitives
take ``relu=(scale, bias)``, the forward's coefficients: they recompute the
pre-activation ``(x - mean) * scale + bias`` with the forward's operations
(the same rounding, so the same sign) from the ``x`` they read anyway, and
use ``dy`` zeroed where it is ``<= 0``, in their sums and in ``dx``: the mask
costs no memory traffic and nothing is saved beyond two C-sized vectors. (One
rounding case differs from ``dy * (y > 0)``: a pre-activation above 0 that
rounds to 0 in a narrower output dtype, below 2**-25 for float16 outputs,
keeps its ``dy``.)

Per-channel vectors (``mean``, ``scale``...) passed to the primitives are 1-D
arrays of the compute dtype on the backend's device. Inputs are C-contiguous
and non-empty; the functional layer handles empty batches.

The per-channel steps between them (what a rank sends, the merge of the
all-reduced sums, the running-statistics update, the affine and backward
coefficients) are the :class:`~.channel_math.ChannelMath` primitives every
backend inherits (``shifted_sums``, ``merge_sums``, ``next_shift``,
``local_stats``, ``forward_coefficients``, ``running_invstd``, ``affine``,
``running_update``, ``backward_coefficients``).

A backend with ``fused = True`` (CuPy) also offers the fused primitives
:mod:`cupysyncbn._sync.fused` runs a pass with, so that a synchronized pass
is three launches around one all-reduce with no host synchronization:
``stats_partials`` / ``fwd_pack`` / ``fwd_norm`` and ``bwd_partials`` /
``bwd_pack`` / ``bwd_elemt`` (the same float64 math as ``ChannelMath``, done
by the kernels of ``kernels/fused.cu`` on the all-reduced buffer).
"""

from __future__ import annotations

from typing import Any

from .channel_math import ChannelMath

__all__ = ["Backend"]


class Backend(ChannelMath):
    """The array backend every implementation derives from (see the module docstring).

    The array helpers and the four primitives are abstract here; the
    per-channel steps come from :class:`~.channel_math.ChannelMath`.
    """

    #: ``"numpy"`` or ``"cupy"``.
    name: str
    #: The array module (``numpy`` or ``cupy``).
    xp: Any
    #: Whether the fused pass primitives exist (see the module docstring).
    fused: bool = False
    #: The reproducible mode's primitives (a namespace with the functions of
    #: :mod:`.exact_sums`), or None where the backend has none yet.
    exact: Any = None

    def owns(self, a: Any) -> bool:
        """True if ``a`` is an array of this backend."""
        raise NotImplementedError

    def device_of(self, a: Any) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        raise NotImplementedError

    def ascontiguous(self, a: Any) -> Any:
        """``a`` itself if C-contiguous, else a C-contiguous copy."""
        raise NotImplementedError

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Convert host data to an array of this backend (current device)."""
        raise NotImplementedError

    def to_host(self, a: Any) -> Any:
        """A NumPy copy (or the array itself for NumPy)."""
        raise NotImplementedError

    def moments(self, x: Any, channel_last: bool, cdt: Any) -> tuple[Any, Any]:
        """Local per-channel ``(mean, m2)`` as float64 vectors."""
        raise NotImplementedError

    def normalize(
        self, x: Any, channel_last: bool, mean: Any, scale: Any, bias: Any, out_dtype: Any,
        relu: bool = False,
    ) -> Any:
        """``(x - mean) * scale + bias`` in the compute dtype, cast to ``out_dtype``.

        ``relu``: values ``<= 0`` written as 0 (NaN kept), in the same pass.
        """
        raise NotImplementedError

    def backward_reduce(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, invstd: Any,
        relu: tuple | None = None,
    ) -> tuple[Any, Any]:
        """Local ``(sum(dy), sum(dy * xhat))`` as float64 vectors.

        ``relu=(scale, bias)``: ``dy`` counts as 0 where the forward's
        ``(x - mean) * scale + bias`` is ``<= 0`` (see the module docstring).
        """
        raise NotImplementedError

    def backward_elemt(
        self,
        dy: Any,
        x: Any,
        channel_last: bool,
        mean: Any,
        a: Any,
        mean_dy: Any,
        b: Any,
        out_dtype: Any,
        relu: tuple | None = None,
    ) -> Any:
        """``a * (dy - mean_dy) - b * (x - mean)`` cast to ``out_dtype``.

        ``relu=(scale, bias)``: ``dy`` masked as in :meth:`backward_reduce`.
        """
        raise NotImplementedError
