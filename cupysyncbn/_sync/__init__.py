"""The synchronized-pass engine (private): what runs between the public API and the backends.

* :mod:`.state`: per-layer state and workspaces, forward contexts and results;
* :mod:`.checks`: every argument check of a pass, in one place;
* :mod:`.protocol`: the header of every all-reduce, the handshake;
* :mod:`.collective`: the packed all-reduce, the handshake, failing together;
* :mod:`.passes`: the passes on the backends' four primitives (NumPy, numba);
* :mod:`.fused`: the passes on the fused GPU kernels (no host synchronization);
* :mod:`.device_status`: the device-side header verdicts, read without a stall.

Nothing here is public API: :mod:`cupysyncbn.functional` is.
"""
