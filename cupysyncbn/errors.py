"""Typed errors raised by cupysyncbn.

All of them derive from the built-in exception a user would catch anyway
(``ValueError`` for bad values, ``RuntimeError`` for collective failures), so
``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "SyncBatchNormError",
    "CollectiveMismatchError",
    "RemoteInputError",
    "CommunicatorError",
    "NoPendingForwardError",
    "CheckpointError",
    "StateMismatchError",
]


class SyncBatchNormError(Exception):
    """Base class of every error raised by cupysyncbn itself."""


class CollectiveMismatchError(SyncBatchNormError, ValueError):
    """Ranks disagree on something that makes their collectives incompatible.

    Raised on every rank of the group, with the same message, for example when
    layers have different ``num_features`` on different ranks, or when one rank
    runs a forward pass while another runs a backward pass.
    """


class RemoteInputError(SyncBatchNormError, ValueError):
    """The input of *another* rank was invalid.

    The rank with the bad input raises the specific ``ValueError``/``TypeError``;
    every other rank raises this, naming the kind of fault, so the whole group
    stops with an error instead of hanging in the collective.
    """


class CommunicatorError(SyncBatchNormError, RuntimeError):
    """A communicator could not be created or a collective failed."""


class NoPendingForwardError(RuntimeError, ValueError):
    """``backward`` found no pending forward context (a ``RuntimeError``).

    Also a ``ValueError`` so that code written for earlier versions, which
    raised ``ValueError`` for a backward before forward, keeps working.
    """


class CheckpointError(SyncBatchNormError, ValueError):
    """A checkpoint file could not be read: truncated, corrupt or not numeric."""


class StateMismatchError(SyncBatchNormError, RuntimeError):
    """Ranks hold different model state (raised on every rank)."""
