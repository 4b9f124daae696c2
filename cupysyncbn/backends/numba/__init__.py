"""The numba backend: fused CPU primitives, one compiled loop each.

``backend`` has the primitives, ``simd`` its explicit LLVM vector loops,
``channel`` its per-channel steps.

Importing this package does not import numba; :mod:`.backend` does.
"""
