"""Paddle <-> PyTorch batch-norm state dicts: names and conventions.

Names
-----
============================  ====================================
Paddle (and cupysyncbn)       PyTorch
============================  ====================================
``weight``                    ``weight``
``bias``                      ``bias``
``_mean``                     ``running_mean``
``_variance``                 ``running_var``
(none)                        ``num_batches_tracked``
============================  ====================================

Keys are renamed by their last dotted component, so a whole model's state
dict converts at once (``block.bn._mean`` -> ``block.bn.running_mean``); other
entries (convolution weights, ...) pass through unchanged.

Conventions
-----------
Momentum: Paddle updates ``running = running * m + batch * (1 - m)``, PyTorch
``running = running * (1 - t) + batch * t``, so ``m = 1 - t`` (PyTorch's
default 0.1 is Paddle's 0.9). PyTorch's ``momentum=None`` (cumulative average)
is cupysyncbn's ``momentum=None``; Paddle has no equivalent.

Running variance: PyTorch averages the *unbiased* batch variance
``var * n/(n-1)`` (``n`` = elements per channel in the batch), Paddle the
*biased* one. The running means are identical. The variances are related
exactly when every batch had the same ``n`` and the statistics started from
PyTorch's and Paddle's initial ``running_var = 1``::

    torch_var - k = (paddle_var - k) * n/(n-1),   k = m ** steps

where ``k`` is the weight left on the initial value after ``steps`` updates
(0 for the cumulative average). Pass ``count=n`` (and ``steps``, or let it be
read from ``num_batches_tracked``) to convert the variance; without ``count``
only the names change, which is right when the source already used the target
convention (e.g. a cupysyncbn layer built with ``unbiased_running_var=True``
exported to PyTorch). Without ``steps`` the initial value is taken as fully
decayed (``k = 0``), a relative error of about ``m ** steps / n``.

Values are returned as given (NumPy, CuPy or torch arrays); only the variance
is recomputed when a conversion is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "PADDLE_TO_TORCH",
    "TORCH_TO_PADDLE",
    "momentum_torch_to_paddle",
    "momentum_paddle_to_torch",
    "rescale_running_var",
    "paddle_to_torch",
    "torch_to_paddle",
]

#: Last-component renames from Paddle to PyTorch.
PADDLE_TO_TORCH = {"_mean": "running_mean", "_variance": "running_var"}
#: Last-component renames from PyTorch to Paddle (``num_batches_tracked`` is dropped or kept).
TORCH_TO_PADDLE = {v: k for k, v in PADDLE_TO_TORCH.items()}


def momentum_torch_to_paddle(t: float | None) -> float | None:
    """PyTorch momentum ``t`` to the Paddle convention ``1 - t`` (None stays None)."""
    return None if t is None else 1.0 - float(t)


def momentum_paddle_to_torch(m: float | None) -> float | None:
    """Paddle momentum ``m`` to the PyTorch convention ``1 - m`` (None stays None)."""
    return None if m is None else 1.0 - float(m)


def _split(key: str) -> tuple[str, str]:
    head, _, last = key.rpartition(".")
    return (head + "." if head else ""), last


def _check_count(count: Any) -> float:
    if isinstance(count, bool) or not isinstance(count, (int, float)) or count <= 1:
        raise ValueError(
            f"count must be the number of elements per channel in one batch (> 1); got {count!r}"
        )
    return float(count)


def rescale_running_var(
    var: Any,
    count: int,
    *,
    to: str,
    paddle_momentum: float | None = 0.9,
    steps: int | None = None,
) -> Any:
    """Convert a running variance between the biased and unbiased conventions.

    Parameters
    ----------
    var : array
        Running variance to convert.
    count : int
        Elements per channel in each batch (global batch x spatial), > 1.
    to : {'torch', 'paddle'}
        Target convention: ``'torch'`` (unbiased) or ``'paddle'`` (biased).
    paddle_momentum : float or None
        Momentum of the updates in the Paddle convention (``1 - t`` for a
        PyTorch momentum ``t``); None for the cumulative average.
    steps : int, optional
        Number of updates since the initial ``running_var = 1``; None treats
        the initial value as fully decayed.

    Returns
    -------
    array
        A new array of ``var``'s type.

    Raises
    ------
    ValueError
        For ``count <= 1`` or an unknown ``to``.
    """
    n = _check_count(count)
    if to not in ("torch", "paddle"):
        raise ValueError(f"to must be 'torch' or 'paddle'; got {to!r}")
    # k: weight still on the initial running_var = 1 after `steps` updates.
    if steps is None:
        k = 0.0
    elif paddle_momentum is None:
        k = 0.0 if int(steps) > 0 else 1.0  # the cumulative average drops it at once
    else:
        k = float(paddle_momentum) ** int(steps)
    factor = n / (n - 1.0) if to == "torch" else (n - 1.0) / n
    return (var - k) * factor + k


def paddle_to_torch(
    state_dict: Mapping[str, Any],
    *,
    count: int | None = None,
    paddle_momentum: float | None = 0.9,
    steps: int | None = None,
    num_batches_tracked: Any = None,
) -> dict[str, Any]:
    """Rename a Paddle/cupysyncbn state dict to PyTorch names.

    Parameters
    ----------
    state_dict : mapping of str to array
        E.g. ``layer.state_dict()`` of a cupysyncbn or Paddle model.
    count : int, optional
        Elements per channel per batch; converts the biased running variance
        to PyTorch's unbiased one (see the module docs). None: names only.
    paddle_momentum : float or None
        Momentum used in training (Paddle convention), for the exact conversion.
    steps : int, optional
        Number of updates, for the exact conversion.
    num_batches_tracked : scalar array, optional
        If given, added as ``num_batches_tracked`` next to every ``running_mean``
        (PyTorch adds 0 itself when it is missing).

    Returns
    -------
    dict
        A new dict; the input is not modified.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        prefix, last = _split(key)
        if last == "_num_batches_tracked":
            out[prefix + "num_batches_tracked"] = value
            continue
        new = PADDLE_TO_TORCH.get(last)
        if new is None:
            out[key] = value
            continue
        if new == "running_var" and count is not None:
            value = rescale_running_var(
                value, count, to="torch", paddle_momentum=paddle_momentum, steps=steps
            )
        out[prefix + new] = value
        if new == "running_mean" and num_batches_tracked is not None:
            out.setdefault(prefix + "num_batches_tracked", num_batches_tracked)
    return out


def torch_to_paddle(
    state_dict: Mapping[str, Any],
    *,
    count: int | None = None,
    paddle_momentum: float | None = 0.9,
    steps: int | None = None,
    keep_num_batches_tracked: bool = False,
) -> dict[str, Any]:
    """Rename a PyTorch state dict to Paddle/cupysyncbn names.

    Parameters
    ----------
    state_dict : mapping of str to array
        E.g. ``module.state_dict()`` of a PyTorch model.
    count : int, optional
        Elements per channel per batch; converts the unbiased running variance
        to Paddle's biased one. None: names only (load it into a cupysyncbn
        layer with ``unbiased_running_var=True`` to keep PyTorch's convention).
    paddle_momentum : float or None
        ``1 - t`` for the PyTorch momentum ``t`` used in training; None for
        PyTorch's ``momentum=None``.
    steps : int, optional
        Number of updates; defaults to the layer's ``num_batches_tracked``.
    keep_num_batches_tracked : bool
        Keep ``num_batches_tracked`` as ``_num_batches_tracked`` (what a
        cupysyncbn layer with ``momentum=None`` stores); else dropped.

    Returns
    -------
    dict
        A new dict; the input is not modified.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        prefix, last = _split(key)
        if last == "num_batches_tracked":
            if keep_num_batches_tracked:
                out[prefix + "_num_batches_tracked"] = value
            continue
        new = TORCH_TO_PADDLE.get(last)
        if new is None:
            out[key] = value
            continue
        if new == "_variance" and count is not None:
            n_steps = steps
            if n_steps is None and prefix + "num_batches_tracked" in state_dict:
                n_steps = int(state_dict[prefix + "num_batches_tracked"])
            value = rescale_running_var(
                value, count, to="paddle", paddle_momentum=paddle_momentum, steps=n_steps
            )
        out[prefix + new] = value
    return out
