"""How the framework adapters' layers hold their communicator."""

from __future__ import annotations

from typing import Any

__all__ = ["SharedComm"]


class SharedComm:
    """Holds a layer's communicator.

    Shared by ``copy.deepcopy`` (an EMA copy of a model syncs over the same
    group), dropped by pickling (``torch.save(model)`` or ``paddle.save`` of a
    whole model reloads with the default communicator: a communicator is a
    live connection, not state).
    """

    __slots__ = ("comm",)

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def __deepcopy__(self, memo: dict) -> SharedComm:
        return self

    def __reduce__(self) -> tuple:
        return (SharedComm, (None,))
