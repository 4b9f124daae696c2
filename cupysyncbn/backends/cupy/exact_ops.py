"""The reproducible mode's primitives on CuPy arrays (``CupyBackend.exact``).

The same namespace as :mod:`cupysyncbn.backends.exact_sums` (what
``cupysyncbn._sync.exact`` calls), with the data passes on the GPU
(``kernels/exact.cu`` through :class:`~.backend.CupyBackend`) and the
C-sized steps (bound exponents, finalize) in NumPy on the host, by the
reference functions themselves: the bits are the CPU backends'. Those steps
copy C-sized vectors to the host, so a reproducible pass synchronizes with
the stream (the default mode's fused passes do not).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import exact_samples, exact_sums

__all__ = ["CupyExactOps"]


class CupyExactOps:
    """``exact_sums``' functions for a :class:`~.backend.CupyBackend`."""

    FOLD_BITS = exact_sums.FOLD_BITS
    MAX_COUNT = exact_sums.MAX_COUNT
    EMPTY_EXP = exact_sums.EMPTY_EXP
    NONFINITE_EXP = exact_sums.NONFINITE_EXP
    folds_for = staticmethod(exact_sums.folds_for)
    check_count = staticmethod(exact_sums.check_count)
    scale_exponent = staticmethod(exact_sums.scale_exponent)
    QUANTITIES = exact_samples.QUANTITIES
    local_bounds = staticmethod(exact_samples.local_bounds)
    grids = staticmethod(exact_samples.grids)
    safe = staticmethod(exact_samples.safe)
    backward_safe = staticmethod(exact_samples.backward_safe)
    fold_moments = staticmethod(exact_samples.fold_moments)
    fold_sums = staticmethod(exact_samples.fold_sums)
    finalize_sample_moments = staticmethod(exact_samples.finalize_sample_moments)

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.xp = backend.xp

    def to_host(self, a: Any) -> Any:
        """``a`` as a NumPy array (a copy from the device when it is a CuPy array)."""
        return self.xp.asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def sample_moments(self, v: Any, channel_last: bool, samples: int) -> tuple:
        """``exact_samples.sample_moments``: the kernel's partials, copied to the host.

        The per-sample path's C-sized steps (bounds, folds, finalize) run on
        the host with the reference functions themselves.
        """
        return tuple(self.to_host(self._backend.exact_sample_moments(v, channel_last,
                                                                     samples)))

    def sample_backward(self, dy: Any, x: Any, channel_last: bool, mean: Any,
                        samples: int) -> tuple:
        """``exact_samples.sample_backward``: the kernel's partials, copied to the host."""
        return tuple(self.to_host(self._backend.exact_sample_backward(
            dy, x, channel_last, mean, samples)))

    def absmax(self, v: Any, channel_last: bool) -> Any:
        """``exact_sums.absmax`` (a device vector)."""
        return self._backend.exact_absmax(v, channel_last)

    def bound_exponent(self, a: Any, nf: int) -> np.ndarray:
        """``exact_sums.bound_exponent`` (a host vector: the exponents are decided there)."""
        return exact_sums.bound_exponent(None if a is None else self.to_host(a), nf)

    def moment_folds(self, v: Any, channel_last: bool, e: Any, k: int) -> tuple[Any, Any]:
        """``exact_sums.moment_folds`` (device folds)."""
        return self._backend.exact_moment_folds(v, channel_last, self.xp.asarray(e), k)

    def backward_bounds(self, dy: Any, x: Any, channel_last: bool, mean: Any) -> tuple:
        """``exact_sums.backward_bounds`` (device vectors)."""
        return self._backend.exact_backward_bounds(dy, x, channel_last, mean)

    def backward_folds(
        self, dy: Any, x: Any, channel_last: bool, mean: Any, e_g: Any, e_h: Any, k: int,
    ) -> tuple[Any, Any]:
        """``exact_sums.backward_folds`` (device folds)."""
        xp = self.xp
        return self._backend.exact_backward_folds(
            dy, x, channel_last, mean, xp.asarray(e_g), xp.asarray(e_h), k)

    def finalize_moments(self, p1: Any, p2: Any, count: int, e: Any) -> tuple[Any, Any]:
        """``exact_sums.finalize_moments`` on the host; device results."""
        h = self.to_host
        mean, var = exact_sums.finalize_moments(h(p1), h(p2), count, h(e))
        return self.xp.asarray(mean), self.xp.asarray(var)

    def scaled_stats(self, p1: Any, p2: Any, count: int, e: Any, mean: Any,
                     var: Any) -> tuple[Any, Any, Any] | None:
        """``exact_sums.scaled_stats`` on the host; device results (or None)."""
        h = self.to_host
        out = exact_sums.scaled_stats(h(p1), h(p2), count, h(e), h(mean), h(var))
        return None if out is None else tuple(self.xp.asarray(a) for a in out)

    def finalize_sum(self, p: Any, e: Any) -> Any:
        """``exact_sums.finalize_sum`` on the host; a device result."""
        return self.xp.asarray(exact_sums.finalize_sum(self.to_host(p), self.to_host(e)))

    def normalize(self, v: Any, channel_last: bool, mean: Any, scale: Any, bias: Any,
                  out_dtype: Any) -> Any:
        """``exact_sums.normalize``: the elementwise kernel without FMA contraction."""
        return self._backend.normalize(v, channel_last, mean, scale, bias, out_dtype,
                                       exact=True)

    def backward_elemt(self, dy: Any, x: Any, channel_last: bool, mean: Any, a: Any,
                       mean_dy: Any, b: Any, out_dtype: Any) -> Any:
        """``exact_sums.backward_elemt``: the elementwise kernel without FMA contraction."""
        return self._backend.backward_elemt(dy, x, channel_last, mean, a, mean_dy, b,
                                            out_dtype, exact=True)
