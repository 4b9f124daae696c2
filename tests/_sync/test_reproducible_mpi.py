"""reproducible=True: the same bits on 1 to 5 ranks, for every split (issue #21).

One global batch of 10 samples, 3 training steps whose mean moves (the third
jumps by thousands of standard deviations), then an eval forward, for
float16, bfloat16, float32 and float64 in a channel-first 4-D (NCHW), a
channel-last 4-D (NHWC) and a 2-D (NC) format. Every world size runs as one
``mpiexec`` job that runs every case, with several splits of the batch
(even, uneven, ranks with no sample), on both CPU backends (NumPy and
numba), and writes its bytes to an ``.npz`` per rank. The parent compares,
against the one-rank NumPy run: forward outputs and input gradients in
global sample order, running mean and variance after each step, the
parameter gradients after ``allreduce_gradients(layer, average=False)``, and
the eval outputs. Samples are concatenated along axis 0 of C-contiguous
arrays, so the global array's bytes are the ranks' bytes in rank order.
"""

import json

import numpy as np
import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

N = 10
SPLITS = {
    1: [[10]],
    2: [[5, 5], [3, 7], [0, 10]],
    3: [[3, 3, 4], [1, 0, 9], [4, 6, 0]],
    4: [[3, 3, 2, 2], [0, 1, 0, 9], [7, 1, 1, 1]],
    5: [[2, 2, 2, 2, 2], [0, 0, 10, 0, 0], [1, 2, 3, 4, 0]],
}
DTYPES = ["float16", "bfloat16", "float32", "float64"]
FORMATS = {"NCHW": (3, 4, 5), "NHWC": (4, 5, 3), "NC": (3,)}
BACKENDS = ["numpy", "numba"]
STEPS = 3

CODE = r"""
import json, os, sys
import ml_dtypes  # noqa: F401 - bfloat16
import numpy as np
import cupysyncbn as sbn

out_dir, cfg = sys.argv[1], json.loads(sys.argv[2])
comm = sbn.init("mpi")
r, size = comm.rank, comm.size
res = {}


def as_bytes(a):
    return np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)


for backend in cfg["backends"]:
    os.environ["CUPYSYNCBN_CPU_BACKEND"] = backend
    for dtype in cfg["dtypes"]:
        dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(ml_dtypes.bfloat16)
        for fmt, rest in cfg["formats"].items():
            shape = (cfg["n"], *rest)
            rng = np.random.default_rng(7)
            ca = 1 if fmt.startswith("NC") else len(shape) - 1
            cs = [1] * len(shape)
            cs[ca] = 3
            xs = [((rng.standard_normal(shape) * np.array([1.0, 0.01, 30.0]).reshape(cs))
                   + np.array([0.5, -2.0, 40.0]).reshape(cs) + off).astype(dt)
                  for off in (0.0, 3.0, -4000.0)]
            dys = [rng.standard_normal(shape).astype(dt) for _ in xs]
            for si, split in enumerate(cfg["splits"]):
                lo = sum(split[:r])
                sl = slice(lo, lo + split[r])
                layer = sbn.SyncBatchNorm(
                    3, data_format=fmt, comm=comm, reproducible=True, momentum=0.8,
                    dtype="float64" if dtype == "float64" else "float32",
                )
                layer.weight.data[...] = [1.5, -0.5, 2.0]
                layer.bias.data[...] = [0.1, 0.2, -0.3]
                key = f"{backend}|{dtype}|{fmt}|{si}|"
                for step in range(cfg["steps"]):
                    y = layer(np.ascontiguousarray(xs[step][sl]))
                    dx = layer.backward(np.ascontiguousarray(dys[step][sl]))
                    res[key + f"y{step}"] = as_bytes(y)
                    res[key + f"dx{step}"] = as_bytes(dx)
                    res[key + f"rm{step}"] = as_bytes(layer._mean)
                    res[key + f"rv{step}"] = as_bytes(layer._variance)
                sbn.allreduce_gradients(layer, comm=comm, average=False)
                res[key + "gw"] = as_bytes(layer.weight.grad)
                res[key + "gb"] = as_bytes(layer.bias.grad)
                layer.eval()
                res[key + "ev"] = as_bytes(layer(np.ascontiguousarray(xs[1][sl])))
np.savez(os.path.join(out_dir, f"w{size}_r{r}.npz"), **res)
print("RANK DONE", r, len(res), flush=True)
"""

#: Per-sample results (concatenated over ranks) and per-layer ones (equal on every rank).
SAMPLED = [f"{w}{s}" for s in range(STEPS) for w in ("y", "dx")] + ["ev"]
SHARED = [f"{w}{s}" for s in range(STEPS) for w in ("rm", "rv")] + ["gw", "gb"]


def _run(world, tmp_path):
    cfg = {"n": N, "splits": SPLITS[world], "dtypes": DTYPES, "formats": FORMATS,
           "backends": BACKENDS, "steps": STEPS}
    run_mpi(CODE, world, timeout=600, tmp_path=tmp_path, args=(tmp_path, json.dumps(cfg)),
            env={"CUPYSYNCBN_TIMEOUT": "120"})
    return [dict(np.load(tmp_path / f"w{world}_r{r}.npz")) for r in range(world)]


def _global(ranks, key):
    return b"".join(ranks[r][key].tobytes() for r in range(len(ranks)))


def test_every_world_size_and_split_gives_the_one_process_bits(tmp_path):
    results = {w: _run(w, tmp_path) for w in sorted(SPLITS)}
    ref = results[1]
    bad = []
    checked = 0
    for world, ranks in results.items():
        for si in range(len(SPLITS[world])):
            for backend in BACKENDS:
                for dtype in DTYPES:
                    for fmt in FORMATS:
                        base = f"{dtype}|{fmt}|"
                        key = f"{backend}|{base}{si}|"
                        want = f"numpy|{base}0|"
                        for what in SAMPLED:
                            checked += 1
                            if _global(ranks, key + what) != _global(ref, want + what):
                                bad.append(f"w{world} split{SPLITS[world][si]} {key}{what}")
                        for what in SHARED:
                            checked += 1
                            mine = {ranks[r][key + what].tobytes() for r in range(world)}
                            if mine != {ref[0][want + what].tobytes()}:
                                bad.append(f"w{world} split{SPLITS[world][si]} {key}{what}")
    cases = sum(map(len, SPLITS.values())) * len(BACKENDS) * len(DTYPES) * len(FORMATS)
    assert checked == cases * (len(SAMPLED) + len(SHARED)) == 4680
    assert not bad, f"{len(bad)} of {checked} results differ from one process: {bad[:20]}"
    # the comparison sees a difference where there is one: the steps differ
    one = ref[0]
    assert one["numpy|float32|NCHW|0|y0"].tobytes() != one["numpy|float32|NCHW|0|y1"].tobytes()
