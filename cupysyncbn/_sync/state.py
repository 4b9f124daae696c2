"""What a synchronized pass keeps between calls, and what a forward hands to its backward.

* :class:`SyncState`: per-layer state (the merge's shift, the handshake's
  outcome, header counters) and its workspaces (wire buffers, the fused
  path's device workspaces, the memo of the last checks that passed).
  Everything outside this module goes through its methods.
* :class:`ForwardContext`: what :func:`cupysyncbn.functional.batch_norm_backward`
  needs from the forward.
* :class:`ForwardResult`: the outputs of a forward;
* :class:`DeviceWorkspace`: one layer's reusable device arrays on the fused
  (GPU) path, kept in its :class:`SyncState`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arrays.formats import DataFormat
from ..backends import Backend
from ..comm.base import LOCAL, Communicator
from ..modes import eval_is_counted
from . import protocol
from .device_status import DeviceStatus, capturing_stream

__all__ = [
    "SyncState", "ForwardContext", "ForwardResult", "DeviceWorkspace", "workspace",
    "workspace_key",
]

_F64 = np.dtype(np.float64)


@dataclass
class SyncState:
    """Per-layer state that makes the synchronized passes cheap.

    Holds the shift ``K`` of the merge (the previous global batch mean), whether
    the ``num_features`` handshake has been done, and reusable communication
    buffers. It never affects results beyond rounding: passing ``None`` instead
    gives the same values with more collectives.
    """

    shift: Any = None
    handshake_done: bool = False
    layer_id: int = 0  # agreed at the handshake (see protocol.next_layer_id)
    calls: int = 0  # synchronized passes run so far (sent in the header)
    evals: int = 0  # eval-mode forwards run so far (sent in the header)
    #: Order of construction (protocol.next_construction_ordinal): names the
    #: same layer on every rank, computed without communication. The layers
    #: set it; 0 (a bare functional-API state) leaves only the order of
    #: first synchronization to tell layers apart.
    ordinal: int = 0
    ident: int = 0  # protocol.layer_identity, fixed at the handshake
    num_features: int | None = None  # fixed at the handshake
    #: The layer runs the reproducible passes (``_sync.exact``): set by a
    #: layer's constructor, or by the functional API from its ``reproducible``
    #: argument before any collective; None: not set (a call's None then
    #: means ``CUPYSYNCBN_REPRODUCIBLE``).
    reproducible: bool | None = None
    _buffers: dict = field(default_factory=dict, repr=False)
    #: ``(key, verdict)`` of the last forward whose checks passed (see
    #: ``_sync.checks``): a steady-state pass skips them.
    _checked: Any = field(default=None, repr=False)
    #: The communicator (None: the default) the ordinal was counted on.
    _ordinal_comm: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def for_layer(cls, comm: Any) -> SyncState:
        """A new layer's state: its construction ordinal on ``comm`` (None: the default)."""
        state = cls(ordinal=protocol.next_construction_ordinal(comm))
        state._ordinal_comm = comm
        return state

    def __deepcopy__(self, memo: dict) -> SyncState:
        """A fresh state: the copy of a layer is a new layer.

        It gets the next construction ordinal on the same communicator
        (counted on every rank in program order, like a construction), and
        shares no buffers, shift or handshake with this one.
        """
        new = type(self)() if not self.ordinal else type(self).for_layer(self._ordinal_comm)
        new.reproducible = self.reproducible
        return new

    def __reduce__(self) -> tuple:
        # Pickled layers store no communicator and no buffers (device
        # workspaces cannot be pickled): loading counts a new ordinal on the
        # default communicator's sequence, as the loaded layer uses it.
        if not self.ordinal:
            return (SyncState, ())
        return (_unpickled, (self.reproducible,))

    def buffer(self, backend: Backend, size: int) -> Any:
        """A reusable float64 buffer of ``size`` slots on ``backend``."""
        key = (backend.name, size, _device_key(backend))
        buf = self._buffers.get(key)
        if buf is None:
            buf = backend.xp.empty(size, dtype=_F64)
            self._buffers[key] = buf
        return buf

    def workspace(self, key: tuple, make: Callable[[], Any] | None = None) -> Any:
        """The workspace stored under ``key``; made with ``make()`` if absent (else None)."""
        ws = self._buffers.get(key)
        if ws is None and make is not None:
            ws = self._buffers[key] = make()
        return ws

    def buffer_libraries(self) -> set:
        """Names of the backends this state's buffers live on (``{'numpy'}``, ``{'cupy'}``...)."""
        return {key[0] for key in self._buffers}

    def memo(self, key: Any) -> Any:
        """The verdict remembered for ``key`` by :meth:`remember`, or None."""
        checked = self._checked
        return checked[1] if checked is not None and checked[0] == key else None

    def remember(self, key: Any, verdict: Any) -> None:
        """Remember the verdict of a forward's checks (one entry: the last call)."""
        self._checked = (key, verdict)

    def eval_batch_pass(self, comm: Any) -> Any:
        """The communicator of an eval-mode pass that uses batch statistics.

        Such a pass (``track_running_stats=False``, ``use_global_stats=False``,
        ``trainable_statistics``) is counted like every eval forward (the
        header's ``evals`` slot), so a rank in eval mode while its peers train
        is caught in that very pass on every rank. Inside
        :class:`cupysyncbn.local_eval` it is not counted and runs on this
        rank's own batch: ``LOCAL``, no communication.
        """
        if eval_is_counted():
            self.evals += 1
            return comm
        return LOCAL

    def next_ids(self) -> tuple[int, int, int, int]:
        """``(layer, call, ident, evals)`` header values of the next pass; counts the pass."""
        call = self.calls
        self.calls += 1
        return self.layer_id, call, self.ident, self.evals

    def reset(self) -> None:
        """Forget the shift, the handshake and the buffers (e.g. after ``to()``)."""
        self.shift = None
        self.handshake_done = False
        self.layer_id = 0
        self.calls = 0
        self.evals = 0
        self.ident = 0
        self.num_features = None
        self._buffers.clear()
        self._checked = None


def _unpickled(reproducible: bool | None) -> SyncState:
    """An unpickled layer's state: a new ordinal on the default sequence, the same mode."""
    state = SyncState.for_layer(None)
    state.reproducible = reproducible
    return state


def _device_key(backend: Backend) -> Any:
    if backend.name == "numpy":
        return None
    return backend.xp.cuda.Device().id


@dataclass
class ForwardContext:
    """What :func:`batch_norm_backward` needs from the forward pass."""

    x: Any  # canonical, contiguous view of the input
    shape: tuple
    dtype: np.dtype
    fmt: DataFormat
    backend: Backend
    comm: Communicator
    mean: Any  # per-channel, compute dtype
    invstd: Any  # per-channel, compute dtype
    weight: Any  # per-channel, compute dtype, or None (weight fixed at 1)
    count: int  # global elements per channel
    batch_stats: bool  # True: training statistics (backward syncs)
    param_dtype: np.dtype
    sync_state: SyncState | None
    #: Fused (GPU) path: ``(stats64, statc, weight)`` the backward kernels read
    #: (float64 mean/var/count, compute-dtype mean/invstd, the live weight).
    fused: Any = None
    #: Per-channel powers of two that brought channels with an extreme spread
    #: to unit scale (``_sync.passes``: such a pass runs in float64), or None.
    unit: Any = None
    #: The pass ran in reproducible mode (``_sync.exact``): so does its backward.
    reproducible: bool = False
    #: Reproducible backward: the global parameter gradients ``(dweight, dbias)``
    #: (float64, identical on every rank), set by the backward for the layer.
    global_grads: Any = None
    #: ``act="relu"``: what the backward recomputes the forward's
    #: pre-activation sign from (its mask): ``(scale, bias)`` of the normalize
    #: (compute dtype) on the host path, ``(weight, bias)`` on the fused path
    #: (the kernels recompute ``scale = invstd * weight``). None: no activation.
    act: Any = None
    #: The layer's steady-state plan (``_sync.passes.SteadyPlan``) that ran
    #: the forward, for its backward; None: the general path ran it.
    plan: Any = None


@dataclass
class ForwardResult:
    """Outputs of :func:`batch_norm_forward`.

    Attributes
    ----------
    y : array
        Normalized output, same shape and dtype as the input.
    ctx : ForwardContext
        Pass to :func:`batch_norm_backward`.
    running_mean, running_var : array or None
        Updated running statistics (new arrays), or the inputs unchanged when
        no update happened (eval mode, empty global batch, no running stats).
    batch_mean, batch_var : array or None
        Global batch statistics in float64 (biased variance); None in eval.
    count : int or 0-d device array
        Global number of elements per channel (0 in eval mode). On the fused
        GPU path it stays on the device (``int(count)`` synchronizes).
    updated : bool
        Whether the running statistics were updated. On the fused GPU path:
        whether an update was requested; the device leaves them unchanged for
        an empty global batch.
    """

    y: Any
    ctx: ForwardContext
    running_mean: Any
    running_var: Any
    batch_mean: Any = None
    batch_var: Any = None
    count: int = 0
    updated: bool = False


class DeviceWorkspace:
    """One layer's reusable device arrays on one device.

    Scratch arrays (``ws(key, size, dtype)``) are kept per CUDA stream: a pass
    on a side stream (PyTorch's, a capture stream) never shares scratch with
    passes on another stream, and a stream-ordered pool (CuPy's, PyTorch's
    caching allocator) frees each array on the stream that used it.

    CUDA graphs: a replay writes to the addresses captured, so nothing a
    captured pass used may go back to the pool while the graph can replay.
    :meth:`begin_pass` notes a capture; from then on an array replaced by a
    larger one is kept (``kept``) instead of freed, and :meth:`keep` holds the
    per-pass arrays of captured passes (saved statistics, gradients): for
    the layer's lifetime, since the graph's is not known here.
    """

    def __init__(self, xp: Any, nf: int) -> None:
        self.xp = xp
        self.nf = nf
        self._arrays: dict = {}
        self._stream = 0  # the current stream's handle, set by begin_pass()
        self.capturing = False  # the current pass runs inside a CUDA-graph capture
        self.captured = False  # some pass did
        self.kept: list = []
        self.status = DeviceStatus(xp)
        self.shift_next = xp.zeros(nf, dtype=_F64)
        self.shift_used = xp.zeros(nf, dtype=_F64)
        self.has_shift = False
        # momentum=None: [batches before this pass, after it], counted on the
        # device (an empty global batch does not count), and the host's
        # num_batches_tracked the device count was last aligned with.
        self.nbt = xp.zeros(2, dtype=_F64)
        self.nbt_host: int | None = None

    def begin_pass(self) -> bool:
        """Note the current stream and whether it is capturing; return the latter."""
        stream = self.xp.cuda.get_current_stream()
        self._stream = stream.ptr
        self.capturing = capturing = capturing_stream(stream)
        if capturing:
            self.captured = True
        return capturing

    def keep(self, *arrays: Any) -> None:
        """Hold ``arrays`` (a captured pass's) for the layer's lifetime."""
        self.kept.extend(a for a in arrays if a is not None)

    def __call__(self, key: str, size: int, dtype: Any) -> Any:
        """A reusable 1-D array of at least ``size`` elements (a view of ``size``)."""
        dtype = np.dtype(dtype)
        k = (key, dtype, self._stream)
        a = self._arrays.get(k)
        if a is None or a.size < size:
            if a is not None and self.captured:
                self.kept.append(a)  # a captured graph may still write to it
            a = self.xp.empty(max(size, 1), dtype=dtype)
            self._arrays[k] = a
        return a[:size]


def workspace_key(backend: Any, nf: int) -> tuple:
    """Where a layer's fused workspace for the current device and ``nf`` is kept."""
    return ("fused", backend.xp.cuda.Device().id, nf)


#: Workspaces of stateless (functional) passes that ran inside a CUDA-graph
#: capture: without a layer to hold them, they live as long as the process.
_CAPTURED_EPHEMERAL: list[DeviceWorkspace] = []


def workspace(state: SyncState | None, backend: Any, nf: int) -> DeviceWorkspace:
    """The layer's workspace for this device, its pass begun (see ``begin_pass``).

    Without a state the workspace is ephemeral, unless the pass is captured.
    """
    if state is None:
        ws = DeviceWorkspace(backend.xp, nf)
        if ws.begin_pass():
            _CAPTURED_EPHEMERAL.append(ws)
        return ws
    ws = state.workspace(workspace_key(backend, nf), lambda: DeviceWorkspace(backend.xp, nf))
    ws.begin_pass()
    return ws
