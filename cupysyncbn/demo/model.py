"""The small network, data and optimizer of ``python -m cupysyncbn.demo``.

Private to the demo (not exported by :mod:`cupysyncbn`): a 1x1 convolution
written as a matmul, ReLU, global average pooling, a linear layer, softmax
cross-entropy and SGD with momentum, each with a hand-written backward. They
work on NumPy or CuPy arrays alike (the array module is taken from the input).

The network::

    x (N, 4, 8, 8) -> Conv1x1(4->16) -> BN2d(16) -> ReLU -> AvgPool
                   -> Linear(16->32) -> BN1d(32, 'NC') -> ReLU -> Linear(32->4)

so one batch-norm layer sees ``N*64`` values per channel and the other only
``N``: with two samples per rank the second one's statistics are very noisy,
which is what synchronized batch norm fixes.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from ..nn.container import Sequential
from ..nn.layer import Layer, Parameter

#: The three runs the demo compares, as its report and figure name them.
LABELS = {
    "global": "one process, global batch",
    "sync": "SyncBN across ranks",
    "local": "local BN per rank",
}

IN_CH, HW, HIDDEN_CONV, HIDDEN_FC, CLASSES = 4, 8, 16, 32, 4


def array_module(a: Any) -> Any:
    """``cupy`` for CuPy arrays, ``numpy`` otherwise (without importing CuPy)."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


class Conv1x1(Layer):
    """1x1 convolution on NCHW as a matmul over the channel axis."""

    #: Keep each sample's parameter gradients in ``samples`` instead of adding
    #: them up (``--reproducible``: summed exactly by :mod:`.reproducible`).
    per_sample = False

    def __init__(self, cin: int, cout: int, rng: np.random.Generator, dtype: Any) -> None:
        super().__init__(dtype=dtype)
        self.weight = Parameter((rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(dtype))
        self.bias = Parameter(np.zeros(cout, dtype=dtype))
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        """``y[n, o, s] = sum_i w[o, i] x[n, i, s] + b[o]``."""
        self._x = x
        n, c, h, w = x.shape
        y = self.weight.data @ x.reshape(n, c, h * w)
        y += self.bias.data[:, None]
        return y.reshape(n, -1, h, w)

    def backward(self, dy: Any) -> Any:
        """Input gradient; accumulates weight and bias gradients."""
        x = self._x
        n, c, h, w = x.shape
        d = dy.reshape(n, dy.shape[1], h * w)
        xs = x.reshape(n, c, h * w)
        gw, gb = d @ xs.transpose(0, 2, 1), d.sum(axis=2)  # per sample
        if self.per_sample:
            self.samples = [(self.weight, gw), (self.bias, gb)]
        else:
            self.weight.accumulate_grad(gw.sum(axis=0))
            self.bias.accumulate_grad(gb.sum(axis=0))
        return (self.weight.data.T @ d).reshape(x.shape)


class Linear(Layer):
    """``y = x @ W + b`` on ``(N, in)`` inputs."""

    #: As :attr:`Conv1x1.per_sample`; the products then run one sample at a
    #: time (a stack of 1-row matmuls), so a sample's bits never depend on
    #: how many others share its batch.
    per_sample = False

    def __init__(self, cin: int, cout: int, rng: np.random.Generator, dtype: Any) -> None:
        super().__init__(dtype=dtype)
        self.weight = Parameter((rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(dtype))
        self.bias = Parameter(np.zeros(cout, dtype=dtype))
        self._x: Any = None

    def forward(self, x: Any) -> Any:
        """Affine map."""
        self._x = x
        if self.per_sample:
            return (x[:, None, :] @ self.weight.data)[:, 0, :] + self.bias.data
        return x @ self.weight.data + self.bias.data

    def backward(self, dy: Any) -> Any:
        """Input gradient; accumulates weight and bias gradients."""
        if self.per_sample:
            self.samples = [(self.weight, self._x[:, :, None] * dy[:, None, :]),
                            (self.bias, dy)]
            return (dy[:, None, :] @ self.weight.data.T)[:, 0, :]
        self.weight.accumulate_grad(self._x.T @ dy)
        self.bias.accumulate_grad(dy.sum(axis=0))
        return dy @ self.weight.data.T


class ReLU(Layer):
    """``max(x, 0)``."""

    def __init__(self) -> None:
        super().__init__()
        self._mask = None

    def forward(self, x: Any) -> Any:
        """Rectify."""
        self._mask = x > 0
        return x * self._mask

    def backward(self, dy: Any) -> Any:
        """Pass the gradient where the input was positive."""
        return dy * self._mask


class AvgPool(Layer):
    """Global average pooling ``(N, C, H, W) -> (N, C)``."""

    def __init__(self) -> None:
        super().__init__()
        self._shape: tuple = ()

    def forward(self, x: Any) -> Any:
        """Mean over the spatial axes."""
        self._shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy: Any) -> Any:
        """Spread the gradient evenly over the pooled positions."""
        n, c, h, w = self._shape
        xp = array_module(dy)
        return xp.broadcast_to((dy / (h * w))[:, :, None, None], self._shape).copy()


def build_model(
    bn2d: Callable[[int], Layer], bn1d: Callable[[int], Layer], seed: int, dtype: Any
) -> Sequential:
    """The demo network with the given batch-norm factories (same init for a seed)."""
    rng = np.random.default_rng([seed, 1])
    return Sequential(
        ("conv", Conv1x1(IN_CH, HIDDEN_CONV, rng, dtype)),
        ("bn1", bn2d(HIDDEN_CONV)),
        ("relu1", ReLU()),
        ("pool", AvgPool()),
        ("fc1", Linear(HIDDEN_CONV, HIDDEN_FC, rng, dtype)),
        ("bn2", bn1d(HIDDEN_FC)),
        ("relu2", ReLU()),
        ("fc2", Linear(HIDDEN_FC, CLASSES, rng, dtype)),
    )


def softmax_cross_entropy(
    logits: Any, labels: Any, denom: int | None = None
) -> tuple[float, Any, Any]:
    """Mean cross-entropy over the batch, its gradient, and the number correct.

    Returns ``(sum_of_losses, dlogits_of_the_mean_loss, n_correct)``; the sum
    (not the mean) lets ranks add their losses into the global mean.
    """
    xp = array_module(logits)
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    ez = xp.exp(z)
    s = ez.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    loss_sum = float((xp.log(s[:, 0]) - z[rows, labels]).sum())
    grad = ez / s
    grad[rows, labels] -= 1.0
    grad /= max(n, 1) if denom is None else denom  # denom: the global batch size
    correct = int((logits.argmax(axis=1) == labels).sum())
    return loss_sum, grad, correct


class SGD:
    """SGD with momentum: ``v = mu * v + g; p -= lr * v``."""

    def __init__(self, model: Layer, lr: float, momentum: float = 0.9) -> None:
        self.params = [p for p in model.parameters() if p.trainable]
        self.lr = lr
        self.momentum = momentum
        self._v: list = [None] * len(self.params)

    def step(self) -> None:
        """Update every trainable parameter from its gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            v = self._v[i]
            if v is None:
                v = self._v[i] = p.grad.copy()
            else:
                v *= self.momentum
                v += p.grad
            p.data -= self.lr * v


class DataSource:
    """Deterministic synthetic classification data, regenerated from a seed.

    Each class has a spatial template; a sample is its class template times a
    random gain, plus per-channel offsets and noise. Batch ``step`` is the
    same array on every process, so each rank can take its slice and the
    global-batch run can use the whole of it without any data exchange.
    """

    def __init__(self, seed: int, dtype: Any) -> None:
        rng = np.random.default_rng([seed, 2])
        self.seed = seed
        self.dtype = np.dtype(dtype)
        self.templates = rng.standard_normal((CLASSES, IN_CH, HW, HW))
        self.offsets = rng.uniform(-3.0, 3.0, IN_CH)[:, None, None]

    def _make(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, n)
        gain = rng.uniform(0.5, 2.0, n)[:, None, None, None]
        x = self.templates[labels] * gain + self.offsets
        x = x + rng.standard_normal(x.shape)
        return x.astype(self.dtype), labels

    def batch(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The global training batch of ``step`` (``n`` samples)."""
        return self._make(np.random.default_rng([self.seed, 3, step]), n)

    def eval_set(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A fixed held-out set."""
        return self._make(np.random.default_rng([self.seed, 4]), n)
