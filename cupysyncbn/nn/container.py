"""Layer containers: ``Sequential`` and ``LayerList``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from .layer import Layer

__all__ = ["Sequential", "LayerList"]


class Sequential(Layer):
    """Layers applied in order; ``backward`` runs their backwards in reverse.

    Parameters
    ----------
    *layers : Layer or (name, Layer) pairs, or one OrderedDict
        The sub-layers, named ``"0", "1", ...`` unless names are given.

    Examples
    --------
    >>> import cupysyncbn as sbn
    >>> model = sbn.Sequential(sbn.BatchNorm1D(4), sbn.BatchNorm1D(4))
    """

    def __init__(self, *layers: Any) -> None:
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (dict, OrderedDict)):
            items = list(layers[0].items())
        elif layers and all(isinstance(t, tuple) for t in layers):
            items = list(layers)
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential takes Layer objects; got {type(layer).__name__} for {name!r}"
                )
            self.add_sublayer(name, layer)

    def __getitem__(self, idx: int | str | slice) -> Any:
        layers = list(self._sub_layers.values())
        if isinstance(idx, slice):
            return Sequential(*layers[idx])
        if isinstance(idx, str):
            return self._sub_layers[idx]
        return layers[idx]

    def __len__(self) -> int:
        return len(self._sub_layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._sub_layers.values())

    def forward(self, x: Any) -> Any:
        """Apply every sub-layer in order."""
        for layer in self._sub_layers.values():
            x = layer(x)
        return x

    def backward(self, dy: Any) -> Any:
        """Apply every sub-layer's ``backward`` in reverse order."""
        for layer in reversed(list(self._sub_layers.values())):
            dy = layer.backward(dy)
        return dy


class LayerList(Layer):
    """A list of layers registered as sub-layers (no forward of its own).

    Parameters
    ----------
    sublayers : iterable of Layer, optional
    """

    def __init__(self, sublayers: Iterable[Layer] | None = None) -> None:
        super().__init__()
        for layer in sublayers or ():
            self.append(layer)

    def append(self, layer: Layer) -> LayerList:
        """Add ``layer`` at the end."""
        if not isinstance(layer, Layer):
            raise TypeError(f"LayerList takes Layer objects; got {type(layer).__name__}")
        self.add_sublayer(str(len(self._sub_layers)), layer)
        return self

    def extend(self, layers: Iterable[Layer]) -> LayerList:
        """Add several layers at the end."""
        for layer in layers:
            self.append(layer)
        return self

    def __getitem__(self, idx: int) -> Layer:
        return list(self._sub_layers.values())[idx]

    def __setitem__(self, idx: int, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"LayerList takes Layer objects; got {type(layer).__name__}")
        name = list(self._sub_layers)[idx]
        self._sub_layers[name] = layer  # keep the position
        object.__setattr__(self, name, layer)

    def __len__(self) -> int:
        return len(self._sub_layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._sub_layers.values())
