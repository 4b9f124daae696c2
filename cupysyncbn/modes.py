"""Per-thread switches that change what a forward does: ``no_grad`` and ``local_eval``.

Both are context managers (and decorators), per thread, and nest:

* :class:`no_grad`: forwards keep no context for a backward;
* :class:`local_eval`: eval-mode forwards are not counted in the header, for
  programs in which only some ranks evaluate on purpose.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["no_grad", "is_grad_enabled", "local_eval", "eval_is_counted"]

_grad_mode = threading.local()
_eval_mode = threading.local()


def is_grad_enabled() -> bool:
    """False inside :func:`no_grad` (in this thread), True otherwise."""
    return getattr(_grad_mode, "enabled", True)


class no_grad:
    """Context manager (or decorator) under which forwards keep no backward context.

    Layers normally keep, for every forward, what the matching ``backward``
    needs (the input among it). Inside ``with cupysyncbn.no_grad():`` they
    keep nothing, so evaluation or statistics-only loops hold no memory and a
    later ``backward`` cannot pick up one of their forwards. Training-mode
    forwards still update running statistics (as in PyTorch). The mode is
    per thread and nests.

    Examples
    --------
    >>> import numpy as np, cupysyncbn as sbn
    >>> bn = sbn.BatchNorm1D(3)
    >>> with sbn.no_grad():
    ...     y = bn(np.ones((4, 3), "float32"))
    """

    def __enter__(self) -> no_grad:
        self._prev = is_grad_enabled()
        _grad_mode.enabled = False
        return self

    def __exit__(self, *exc: Any) -> None:
        _grad_mode.enabled = self._prev

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with no_grad():
                return fn(*args, **kwargs)

        return inner


def eval_is_counted() -> bool:
    """False inside :class:`local_eval` (in this thread), True otherwise."""
    return getattr(_eval_mode, "depth", 0) == 0


class local_eval:
    """Eval forwards inside this block are not counted in the header.

    Every eval-mode forward of a synchronized layer advances its eval counter,
    so one rank in eval mode while the others train is caught at the next
    synchronized pass. A program in which only some ranks evaluate on purpose
    (rank 0 runs the validation set, say) wraps that evaluation in
    ``with cupysyncbn.local_eval():`` (per thread; usable as a decorator).
    Training forwards inside the block are synchronized as usual.

    Examples
    --------
    >>> import cupysyncbn as sbn
    >>> with sbn.local_eval():
    ...     pass  # model.eval(); validate(model); model.train()
    """

    def __enter__(self) -> local_eval:
        _eval_mode.depth = getattr(_eval_mode, "depth", 0) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        _eval_mode.depth -= 1

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with local_eval():
                return fn(*args, **kwargs)

        return inner
