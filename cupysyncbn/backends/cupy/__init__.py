"""The CuPy backend: our CUDA kernels, found, instantiated and launched.

``kernels`` finds the ``.cu`` sources and names their instantiations;
``backend`` launches them with ``cupy.RawModule``.

Importing this package does not import CuPy; :mod:`.backend` does.
"""
