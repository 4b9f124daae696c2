"""The small layer framework: ``Parameter``, ``ParamAttr`` and ``Layer``.

Just enough of Paddle's ``nn.Layer`` for batch-norm layers to live in models:
registration of parameters, buffers and sub-layers by attribute assignment,
recursive train/eval, dotted-name state dicts (the live arrays, loaded in
place), gradient clearing, device or dtype moves, ``apply`` and forward hooks.
There is no autograd: layers implement ``forward`` and ``backward`` by hand,
and :func:`cupysyncbn.modes.no_grad` tells them not to keep what a backward
would need.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..arrays.devices import device_of, move_array, parse_device, to_host
from ..arrays.dtypes import native_byteorder, native_dtype, parse_param_dtype

__all__ = [
    "Parameter",
    "ParamAttr",
    "Layer",
    "HookRemoveHelper",
]


class HookRemoveHelper:
    """Handle returned by the ``register_forward_*_hook`` methods; ``remove()`` detaches."""

    _ids = itertools.count()

    def __init__(self, hooks: OrderedDict) -> None:
        self._hooks = hooks
        self._id = next(self._ids)

    def remove(self) -> None:
        """Detach the hook (a second call does nothing)."""
        self._hooks.pop(self._id, None)


class Parameter:
    """A trainable array and its accumulated gradient.

    Parameters
    ----------
    data : array
        The value (NumPy or CuPy).
    trainable : bool
        False for fixed parameters (``weight_attr=False``): no gradient.
    name : str, optional
        Informative name.

    Attributes
    ----------
    data : array
    grad : array or None
        Sum of the gradients since the last ``clear_gradients()``.
    trainable : bool
    """

    __slots__ = ("data", "grad", "trainable", "name", "_global")

    def __init__(self, data: Any, trainable: bool = True, name: str | None = None) -> None:
        self.data = data
        self.grad = None
        self.trainable = bool(trainable)
        self.name = name
        #: ``(grad, total)``: the global gradient a reproducible layer summed
        #: exactly, valid while ``grad`` is still that array (see
        #: :meth:`global_grad`); None otherwise.
        self._global: Any = None

    @property
    def shape(self) -> tuple:
        """Shape of :attr:`data`."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of :attr:`data`."""
        return np.dtype(self.data.dtype)

    def accumulate_grad(self, g: Any) -> None:
        """Add ``g`` to :attr:`grad` (a trainable parameter only)."""
        if not self.trainable:
            return
        if self.grad is None:
            self.grad = g.astype(self.data.dtype, copy=True)
        else:
            self.grad += g

    def accumulate_global_grad(self, g: Any, before: Any) -> None:
        """Add a reproducible layer's global gradient ``g`` (identical on every rank).

        Called right after :meth:`accumulate_grad` added this rank's share;
        ``before`` is :attr:`grad` as it was before that. The global total is
        accumulated like :attr:`grad` (same dtype, same operations) as long as
        :attr:`grad` is the array it started with; anything else (a
        replaced or cleared ``grad``, a gradient from elsewhere) drops it.
        """
        if not self.trainable:
            return
        held = getattr(self, "_global", None)
        if before is None:
            self._global = (self.grad, g.astype(self.data.dtype, copy=True))
        elif held is not None and held[0] is before and self.grad is before:
            held[1][...] += g
        else:
            self._global = None

    def global_grad(self) -> Any:
        """The global gradient kept by a reproducible layer, or None.

        None unless every contribution to :attr:`grad` since it was last
        None came from reproducible synchronized backwards and ``grad`` is
        still the array they wrote (an in-place change of ``grad`` by the
        user cannot be seen).
        """
        held = getattr(self, "_global", None)
        if held is None or held[0] is not self.grad or self.grad is None:
            return None
        return held[1]

    def clear_gradient(self) -> None:
        """Reset :attr:`grad` to None."""
        self.grad = None
        self._global = None

    def numpy(self) -> np.ndarray:
        """A host (NumPy) copy of :attr:`data`."""
        return to_host(self.data)

    def __repr__(self) -> str:
        return (
            f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype.name},"
            f" trainable={self.trainable})"
        )


class ParamAttr:
    """How to create a parameter (Paddle's ``paddle.ParamAttr``).

    Parameters
    ----------
    name : str, optional
        Name given to the parameter.
    initializer : scalar, array or callable, optional
        Initial value: a scalar fills the parameter, an array of the right
        shape is copied, a callable ``f(shape, dtype) -> array`` is called.
        Default: the layer's default (1 for weights, 0 for biases).
    learning_rate : float
        Kept for Paddle compatibility (not used by the layer itself).
    trainable : bool
        Whether the parameter receives gradients.
    """

    def __init__(
        self,
        name: str | None = None,
        initializer: Any = None,
        learning_rate: float = 1.0,
        trainable: bool = True,
    ) -> None:
        self.name = name
        self.initializer = initializer
        self.learning_rate = learning_rate
        self.trainable = trainable

    def __repr__(self) -> str:
        return f"ParamAttr(name={self.name!r}, trainable={self.trainable})"

    def make(self, shape: tuple, dtype: np.dtype, default: float) -> np.ndarray:
        """Create the initial host value."""
        init = self.initializer
        if init is None:
            return np.full(shape, default, dtype=dtype)
        if callable(init):
            value = np.asarray(to_host(init(shape, dtype)), dtype=dtype)
        else:
            value = np.asarray(to_host(init), dtype=dtype)
            if value.ndim == 0:
                value = np.full(shape, value, dtype=dtype)
        if value.shape != tuple(shape):
            raise ValueError(
                f"ParamAttr initializer gives shape {value.shape}; the parameter needs"
                f" {tuple(shape)}"
            )
        return value.copy()


class Layer:
    """Base class of layers: parameters, buffers, sub-layers, modes, state.

    Subclasses call ``super().__init__()`` first, then assign
    :class:`Parameter` s, sub-layers and buffers (:meth:`register_buffer`) as
    attributes, and implement ``forward`` (and ``backward`` for training).
    """

    # Set in __init__ with object.__setattr__ (this class's __setattr__ registers).
    _parameters: OrderedDict
    _sub_layers: OrderedDict
    _buffers: OrderedDict
    training: bool
    _full_name: str
    _dtype: np.dtype
    _forward_pre_hooks: OrderedDict
    _forward_post_hooks: OrderedDict

    def __init__(self, name_scope: str | None = None, dtype: Any = "float32") -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_sub_layers", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_full_name", name_scope or type(self).__name__.lower())
        object.__setattr__(self, "_dtype", np.dtype(dtype))
        object.__setattr__(self, "_forward_pre_hooks", OrderedDict())
        object.__setattr__(self, "_forward_post_hooks", OrderedDict())

    # registration ---------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise RuntimeError("call Layer.__init__() before assigning attributes")
        # Replacing a sub-layer (convert_sync_batchnorm) must keep its place:
        # Sequential runs its sub-layers in registration order.
        if isinstance(value, Layer) and name in self._sub_layers:
            self._sub_layers[name] = value
            object.__setattr__(self, name, value)
            return
        for d in (self._parameters, self._sub_layers, self._buffers):
            d.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[_check_child_name(name)] = value
        elif isinstance(value, Layer):
            self._sub_layers[_check_child_name(name)] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for d in (self._parameters, self._sub_layers, self._buffers):
            d.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value: Any, persistable: bool = True) -> None:
        """Register a non-trainable array kept in the state dict (if persistable)."""
        _check_child_name(name)
        object.__setattr__(self, name, value)
        self._buffers[name] = persistable

    def add_sublayer(self, name: str, sublayer: Layer) -> Layer:
        """Register ``sublayer`` under ``name`` and return it.

        Raises
        ------
        ValueError
            For an empty name or one containing ``.`` (state-dict keys join
            names with dots, so ``"a.b"`` would collide with ``a``'s ``b``).
        """
        name = _check_child_name(str(name))
        setattr(self, name, sublayer)
        return sublayer

    # traversal ------------------------------------------------------------
    def named_sublayers(
        self, prefix: str = "", include_self: bool = False
    ) -> Iterator[tuple[str, Layer]]:
        """Yield ``(dotted_name, layer)`` for every sub-layer, depth first."""
        if include_self:
            yield prefix, self
        for name, layer in self._sub_layers.items():
            full = f"{prefix}.{name}" if prefix else name
            yield full, layer
            yield from layer.named_sublayers(full)

    def sublayers(self, include_self: bool = False) -> list[Layer]:
        """All sub-layers, depth first."""
        return [layer for _, layer in self.named_sublayers(include_self=include_self)]

    def children(self) -> Iterator[Layer]:
        """Direct sub-layers."""
        return iter(self._sub_layers.values())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Yield ``(dotted_name, parameter)`` for this layer and its sub-layers."""
        for lname, layer in self.named_sublayers(prefix, include_self=True):
            for pname, p in layer._parameters.items():
                yield (f"{lname}.{pname}" if lname else pname), p

    def parameters(self, include_sublayers: bool = True) -> list[Parameter]:
        """All parameters (trainable or not)."""
        if not include_sublayers:
            return list(self._parameters.values())
        return [p for _, p in self.named_parameters()]

    def named_buffers(
        self, prefix: str = "", include_sublayers: bool = True
    ) -> Iterator[tuple[str, Any]]:
        """Yield ``(dotted_name, array)`` for every buffer (persistable or not).

        The arrays themselves (running statistics are updated in place, so a
        reference stays current).
        """
        layers = (
            self.named_sublayers(prefix, include_self=True)
            if include_sublayers
            else iter([(prefix, self)])
        )
        for lname, layer in layers:
            for bname in layer._buffers:
                value = getattr(layer, bname)
                if value is not None:
                    yield (f"{lname}.{bname}" if lname else bname), value

    def buffers(self, include_sublayers: bool = True) -> list[Any]:
        """All buffers (running statistics, counters), as the live arrays."""
        return [b for _, b in self.named_buffers(include_sublayers=include_sublayers)]

    def apply(self, fn: Callable[[Layer], Any]) -> Layer:
        """Call ``fn(layer)`` on every sub-layer (depth first), then on self; return self.

        Examples
        --------
        >>> import cupysyncbn as sbn
        >>> model = sbn.Sequential(sbn.BatchNorm1D(3), sbn.BatchNorm1D(3))
        >>> _ = model.apply(lambda m: print(type(m).__name__))
        BatchNorm1D
        BatchNorm1D
        Sequential
        """
        for child in self._sub_layers.values():
            child.apply(fn)
        fn(self)
        return self

    def _named_state(self) -> Iterator[tuple[str, Layer, str, bool]]:
        # (dotted name, owning layer, attribute, is_parameter), in state order
        for lname, layer in self.named_sublayers(include_self=True):
            for pname in layer._parameters:
                yield (f"{lname}.{pname}" if lname else pname), layer, pname, True
            for bname, persist in layer._buffers.items():
                if persist and getattr(layer, bname) is not None:
                    yield (f"{lname}.{bname}" if lname else bname), layer, bname, False

    # modes ----------------------------------------------------------------
    def train(self) -> Layer:
        """Training mode for this layer and all sub-layers; returns self."""
        for layer in self.sublayers(include_self=True):
            object.__setattr__(layer, "training", True)
        return self

    def eval(self) -> Layer:
        """Evaluation mode for this layer and all sub-layers; returns self."""
        for layer in self.sublayers(include_self=True):
            object.__setattr__(layer, "training", False)
        return self

    # gradients ------------------------------------------------------------
    def clear_gradients(self) -> None:
        """Reset the gradient of every parameter to None."""
        for p in self.parameters():
            p.clear_gradient()

    # state ------------------------------------------------------------------
    def state_dict(self) -> OrderedDict:
        """Parameters and persistable buffers by dotted name: the live arrays.

        As in Paddle, the values are the layer's own arrays, which training
        updates in place: a state dict taken earlier shows the current values.
        Copy it (``{k: v.copy() ...}``) to keep a snapshot.
        """
        out = OrderedDict()
        for key, layer, attr, is_param in self._named_state():
            value = getattr(layer, attr)
            out[key] = value.data if is_param else value
        return out

    def _state_aliases(self) -> dict[str, str | None]:
        """Extra accepted names for this layer's own state entries.

        Maps an alias to the entry it loads into, or to None for an entry that
        is accepted and ignored.
        """
        return {}

    def set_state_dict(self, state_dict: dict, strict: bool = True) -> tuple[list, list]:
        """Copy arrays into the parameters and buffers, all or nothing.

        Every entry is validated (name, shape, dtype, values) before
        anything is assigned, so a rejected state dict leaves the layer exactly
        as it was. Values are copied into the existing arrays, so references
        to them (and earlier :meth:`state_dict` results) stay valid. PyTorch
        names (``running_mean``, ``running_var``, ``num_batches_tracked``)
        are accepted for batch-norm layers.

        Parameters
        ----------
        state_dict : dict of str to array
            As returned by :meth:`state_dict` or :func:`cupysyncbn.load`.
        strict : bool
            Raise on missing or unexpected keys (else return them).

        Returns
        -------
        missing_keys, unexpected_keys : list of str

        Raises
        ------
        ValueError, TypeError
            Naming the entry, for a wrong shape or dtype, a value the layer
            refuses (a NaN, infinite or negative running variance, a NaN or
            infinite running mean), one entry given under two names with
            different values (``_mean`` and ``running_mean``), or (strict) a
            missing or unexpected key.
        """
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}")
        targets = {key: (lay, attr, is_p) for key, lay, attr, is_p in self._named_state()}
        aliases: dict[str, str] = {}
        optional: set[str] = set()
        for lname, layer in self.named_sublayers(include_self=True):
            for alias, own in layer._state_aliases().items():
                full_alias = f"{lname}.{alias}" if lname else alias
                if own is None:
                    optional.add(full_alias)
                else:
                    aliases[full_alias] = f"{lname}.{own}" if lname else own
        plan = []
        seen: dict[str, tuple[str, Any]] = {}  # entry -> (key it came from, value)
        unexpected = []
        for key, value in state_dict.items():
            target_key = aliases.get(key, key)
            if target_key not in targets:
                if key in optional:
                    continue
                unexpected.append(key)
                continue
            layer, attr, is_param = targets[target_key]
            current = getattr(layer, attr)
            cur = current.data if is_param else current
            new = _validated(key, value, cur)
            layer._check_state_value(attr, key, new)
            if target_key in seen:
                # One entry under two names (``_mean`` and ``running_mean``):
                # which one would win depends on the dict's order, so only
                # identical values are accepted.
                first, earlier = seen[target_key]
                if not np.array_equal(to_host(earlier), to_host(new)):
                    raise ValueError(
                        f"state_dict has both {first!r} and {key!r}, two names of the same"
                        " entry, with different values; keep only one of them"
                    )
                continue
            plan.append((layer, attr, is_param, new))
            seen[target_key] = (key, new)
        missing = [k for k in targets if k not in seen]
        if strict and (missing or unexpected):
            raise ValueError(
                "state_dict does not match the layer:"
                + (f" missing {missing}" if missing else "")
                + (f" unexpected {unexpected}" if unexpected else "")
            )
        for layer, attr, is_param, new in plan:
            if is_param:
                p = getattr(layer, attr)
                p.data = _copy_into(p.data, new)
            else:
                object.__setattr__(layer, attr, _copy_into(getattr(layer, attr), new))
        for layer in self.sublayers(include_self=True):
            layer._on_state_loaded()
        return missing, unexpected

    def _on_state_loaded(self) -> None:
        """Hook for layers that cache derived state."""

    def _check_state_value(self, attr: str, key: str, value: Any) -> None:
        """Refuse a state-dict value this layer cannot hold (raise ``ValueError`` naming ``key``).

        Called for every entry before anything is assigned; ``value`` has
        passed the shape and dtype checks and lives on the layer's device.
        """

    # devices ----------------------------------------------------------------
    def to(self, device: str | None = None, dtype: Any = None) -> Layer:
        """Move parameters and buffers to ``device`` and/or cast them to ``dtype``.

        Parameters
        ----------
        device : {'cpu', 'cuda', 'cuda:N'}, optional
            ``cpu`` holds NumPy arrays, ``cuda`` CuPy arrays on the current
            device, ``cuda:N`` on device N.
        dtype : {'float32', 'float64'}, optional
            Cast floating parameters and buffers (gradients are cleared).

        Returns
        -------
        Layer
            self.
        """
        dev = parse_device(device) if device is not None else None
        dt = None
        if dtype is not None:
            dt = parse_param_dtype(dtype)
        for layer in self.sublayers(include_self=True):
            for p in layer._parameters.values():
                p.data = move_array(p.data, dev, dt)
                p.grad = None if dt is not None or p.grad is None else move_array(p.grad, dev, None)
            for bname in layer._buffers:
                val = getattr(layer, bname)
                if val is not None:
                    cast = dt if np.dtype(val.dtype).kind == "f" else None
                    object.__setattr__(layer, bname, move_array(val, dev, cast))
            if dt is not None:
                object.__setattr__(layer, "_dtype", dt)
            layer._on_state_loaded()
        return self

    # calling ---------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the output (subclasses implement this)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dy: Any) -> Any:
        """Gradient of the input from the gradient of the output."""
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def register_forward_pre_hook(self, hook: Callable) -> HookRemoveHelper:
        """Run ``hook(layer, inputs)`` before every forward (Paddle's name and semantics).

        ``inputs`` is the tuple of positional arguments; a hook returning
        something other than None replaces them (a non-tuple becomes a
        1-tuple). Hooks run in registration order.

        Returns
        -------
        HookRemoveHelper
            ``handle.remove()`` detaches the hook.
        """
        handle = HookRemoveHelper(self._forward_pre_hooks)
        self._forward_pre_hooks[handle._id] = hook
        return handle

    def register_forward_post_hook(self, hook: Callable) -> HookRemoveHelper:
        """Run ``hook(layer, inputs, output)`` after every forward.

        A hook returning something other than None replaces the output.

        Returns
        -------
        HookRemoveHelper
            ``handle.remove()`` detaches the hook.
        """
        handle = HookRemoveHelper(self._forward_post_hooks)
        self._forward_post_hooks[handle._id] = hook
        return handle

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward_pre_hooks:
            for hook in list(self._forward_pre_hooks.values()):
                res = hook(self, args)
                if res is not None:
                    args = res if isinstance(res, tuple) else (res,)
        out = self.forward(*args, **kwargs)
        if self._forward_post_hooks:
            for hook in list(self._forward_post_hooks.values()):
                res = hook(self, args, out)
                if res is not None:
                    out = res
        return out

    def full_name(self) -> str:
        """The layer's name."""
        return self._full_name

    def extra_repr(self) -> str:
        """Extra text for ``repr``."""
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, sub in self._sub_layers.items():
            sub_repr = repr(sub).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub_repr}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"


def _check_child_name(name: str) -> str:
    # PyTorch refuses the same names, for the same reason.
    if not name or "." in name:
        raise ValueError(
            f"sub-layer and parameter names must be non-empty and contain no '.'; got"
            f" {name!r} (state-dict keys join names with '.', so it would collide)"
        )
    return name


def _validated(key: str, value: Any, current: Any) -> Any:
    """Check ``value`` against ``current`` and return it on ``current``'s device."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        try:
            value = np.asarray(value)
        except Exception:
            raise TypeError(
                f"state_dict[{key!r}] must be an array; got {type(value).__name__}"
            ) from None
    value = native_byteorder(value)  # big-endian checkpoints load like native ones
    vdt = native_dtype(value.dtype)
    cdt = np.dtype(current.dtype)
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(
            f"state_dict[{key!r}] has shape {tuple(value.shape)}; expected {tuple(current.shape)}"
        )
    if vdt != cdt:
        if cdt.kind == "i" and vdt.kind in "iu":
            pass  # counters: any integer width (range checked below)
        else:
            raise TypeError(
                f"state_dict[{key!r}] has dtype {vdt.name}; expected {cdt.name}"
                " (cast it, or move the layer with .to(dtype=...))"
            )
    if cdt.kind == "i":
        _check_counter(key, value, cdt)
    return move_array(value, device_of(current), cdt, copy=True)


def _check_counter(key: str, value: Any, cdt: np.dtype) -> None:
    """Counters (``num_batches_tracked``) are integers in ``[0, max of cdt]``."""
    if np.dtype(value.dtype).kind not in "iu":
        raise TypeError(f"state_dict[{key!r}] must hold integers; got {value.dtype}")
    host = np.asarray(to_host(value))
    if host.size and (int(host.min()) < 0 or int(host.max()) > np.iinfo(cdt).max):
        raise ValueError(
            f"state_dict[{key!r}] must be an integer in [0, {np.iinfo(cdt).max}] (a count"
            f" of batches); got {host.min() if int(host.min()) < 0 else host.max()}"
        )


def _copy_into(current: Any, new: Any) -> Any:
    """Write ``new`` into ``current`` in place; returns the array now holding it.

    ``new`` is a validated copy on ``current``'s device. A read-only
    ``current`` (a user-assigned broadcast view, say) is replaced instead.
    """
    flags = getattr(current, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        return new
    current[...] = new
    return current
