"""Old module paths, kept for one release as thin aliases that warn.

Version 0.1 had twenty flat modules (``cupysyncbn.fault``, ``cupysyncbn.io``,
``cupysyncbn.backends.numba_backend``, ``cupysyncbn.interop.dlpack``, ...).
They moved into the layered tree (docs/design.md); importing an old path
still works, gives a :class:`DeprecationWarning` naming the new one, and
returns a module that forwards every attribute to the new module (and, for
names that moved elsewhere, to where they went). ``python -m`` of an old
path runs the new one. This module is removed in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "install"]

_P = "cupysyncbn."

#: old path -> (new path, other modules that received some of its names,
#: renamed names {old: new}, what ``python -m old`` runs).
MOVED: dict[str, tuple[str, tuple[str, ...], dict[str, str], str | None]] = {
    _P + "layer": (_P + "nn.layer", (_P + "modes", _P + "errors"), {}, None),
    _P + "container": (_P + "nn.container", (), {}, None),
    _P + "norm": (_P + "nn.norm", (), {}, None),
    _P + "grads": (_P + "nn.grads", (), {}, None),
    _P + "io": (_P + "checkpoint", (), {}, None),
    _P + "validation": (_P + "_sync.checks", (_P + "_sync.collective",), {}, None),
    _P + "protocol": (_P + "_sync.protocol", (_P + "modes",), {}, None),
    _P + "fused_passes": (
        _P + "_sync.fused",
        (_P + "_sync.state", _P + "_sync.device_status", _P + "_sync.collective"), {}, None,
    ),
    _P + "deferred": (_P + "_sync.device_status", (_P + "runtime.env",), {}, None),
    _P + "formats": (_P + "arrays.formats", (), {}, None),
    _P + "dtypes": (_P + "arrays.dtypes", (), {"to_native": "native_byteorder"}, None),
    _P + "devices": (_P + "arrays.devices", (), {}, None),
    _P + "interop.dlpack": (_P + "arrays.dlpack", (), {}, None),
    _P + "backends.numpy_backend": (_P + "backends.numpy", (), {}, None),
    _P + "backends.numba_backend": (
        _P + "backends.numba.backend", (), {}, _P + "backends.numba",
    ),
    _P + "backends.numba_simd": (_P + "backends.numba.simd", (), {}, None),
    _P + "backends.numba_channel": (_P + "backends.numba.channel", (), {}, None),
    _P + "backends.cupy_backend": (_P + "backends.cupy.backend", (), {}, None),
    _P + "backends.kernel_source": (_P + "backends.cupy.kernels", (), {}, None),
    _P + "fault": (_P + "runtime.watchdog", (_P + "runtime.env",), {}, None),
    _P + "placement": (
        _P + "runtime.placement", (_P + "runtime.env",), {"_cupy": "cupy_module"}, None,
    ),
    _P + "_demo_model": (_P + "demo.model", (), {}, None),
    _P + "_demo_plot": (_P + "demo.plot", (), {}, None),
}


class _Alias(types.ModuleType):
    """An old module path: every attribute read from where it lives now."""

    def __init__(self, name: str, new: str, extras: tuple, renames: dict) -> None:
        super().__init__(name, f"Deprecated alias of {new}.")
        self.__dict__["_targets"] = (new, *extras)
        self.__dict__["_renames"] = renames

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        attr = self._renames.get(attr, attr)
        for target in self._targets:
            mod = importlib.import_module(target)
            if hasattr(mod, attr):
                return getattr(mod, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __setattr__(self, attr: str, value: Any) -> None:
        # Writes go to the module that owns the name (monkeypatching an old
        # path keeps patching the code that runs).
        setattr(self._owner(attr), self._renames.get(attr, attr), value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._owner(attr), self._renames.get(attr, attr))

    def _owner(self, attr: str) -> types.ModuleType:
        attr = self._renames.get(attr, attr)
        mods = [importlib.import_module(t) for t in self._targets]
        return next((m for m in mods if hasattr(m, attr)), mods[0])

    def __dir__(self) -> list[str]:
        names: set[str] = set()
        for target in self._targets:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


def _stacklevel() -> int:
    """Point the warning at the importing code, past the import machinery's frames."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename
    ):
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    return level


def warn(old: str) -> None:
    """The deprecation warning for ``old`` (a key of :data:`MOVED`)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use"
        f" {MOVED[old][0]}", DeprecationWarning, stacklevel=_stacklevel(),
    )


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new, extras, renames, _ = MOVED[spec.name]
        warn(spec.name)
        importlib.import_module(new)
        return _Alias(spec.name, new, extras, renames)

    def exec_module(self, module: types.ModuleType) -> None:
        return None

    def get_code(self, fullname: str) -> types.CodeType:
        """``python -m OLD`` (runpy): run the new module as ``__main__``."""
        new, _, _, main = MOVED[fullname]
        warn(fullname)
        return compile(
            f"import runpy\nrunpy.run_module({main or new!r}, run_name='__main__',"
            " alter_sys=True)\n", f"<{fullname}: deprecated alias>", "exec",
        )


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


_FINDER = _Finder()


def install() -> None:
    """Make the old paths importable (idempotent; ``import cupysyncbn`` calls it)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def submodule_getattr(package: str) -> Any:
    """A PEP 562 ``__getattr__`` for ``package``: its old submodules as attributes."""

    def __getattr__(name: str) -> types.ModuleType:
        old = f"{package}.{name}"
        if old not in MOVED:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(old)

    return __getattr__
