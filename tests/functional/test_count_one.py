"""SPEC §2: a global count of 1 per channel in training raises on every rank, before any update.

PyTorch raises "Expected more than 1 value per channel when training"; the
biased batch variance of one value is 0, so the pass would otherwise return
``y = bias``, ``dx = 0`` and pull the running variance toward 0 silently.
"""

import json
import re

import numpy as np
import pytest
from support.mpi_runner import run_mpi

import cupysyncbn as sbn
from cupysyncbn.comm.base import NoCommunicator

F = sbn.functional
MATCH = r"Expected more than 1 value per channel when training.*global count of 1"


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("make,shape", [
    (lambda: sbn.SyncBatchNorm(3, comm=NoCommunicator()), (1, 3)),
    (lambda: sbn.SyncBatchNorm(3, comm=NoCommunicator()), (1, 3, 1, 1)),
    (lambda: sbn.SyncBatchNorm(3, data_format="NHWC", comm=NoCommunicator()), (1, 1, 1, 3)),
    (lambda: sbn.BatchNorm1D(3), (1, 3)),
    (lambda: sbn.SyncBatchNorm(3, track_running_stats=False, comm=NoCommunicator()), (1, 3)),
])
def test_layer_count_one_raises_and_changes_nothing(make, shape):
    layer = make()
    before = _state(layer)
    with pytest.raises(ValueError, match=MATCH):
        layer(np.arange(3, dtype=np.float32).reshape(shape))
    after = _state(layer)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # count 2 still works afterwards; eval with running stats takes one sample
    y = layer(np.arange(6, dtype=np.float32).reshape((2, *shape[1:])))
    assert np.isfinite(y).all()
    layer.eval()
    if getattr(layer, "_track_running_stats", True):
        y1 = layer(np.ones(shape, np.float32))
        assert y1.shape == shape and np.isfinite(y1).all()
    else:  # eval without running statistics still normalizes with the batch's (PyTorch too)
        with pytest.raises(ValueError, match=MATCH):
            layer(np.ones(shape, np.float32))


def test_functional_count_one():
    x = np.array([[1.0, 2.0]])
    rm, rv = np.zeros(2), np.ones(2)
    for comm in (None, NoCommunicator()):
        with pytest.raises(ValueError, match=MATCH):
            F.batch_norm_forward(x, running_mean=rm, running_var=rv, training=True,
                                 data_format="NC", comm=comm)
    with pytest.raises(ValueError, match="unbiased"):
        F.batch_norm_forward(x, running_mean=rm, running_var=rv, training=True,
                             data_format="NC", unbiased_running_var=True)
    assert np.array_equal(rm, [0, 0]) and np.array_equal(rv, [1, 1])
    # eval with running statistics: one sample is fine
    res = F.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False,
                               data_format="NC")
    np.testing.assert_allclose(res.y, x / np.sqrt(1 + 1e-5))
    # an empty global batch stays the documented no-op
    res = F.batch_norm_forward(np.zeros((0, 2)), running_mean=rm, running_var=rv,
                               training=True, data_format="NC")
    assert res.y.shape == (0, 2) and np.array_equal(rv, [1, 1])


SNIPPET = r"""
import json
import numpy as np
from mpi4py import MPI
import cupysyncbn as sbn
comm = MPI.COMM_WORLD
r = comm.rank
out = []
for split in ((1, 0), (0, 1)):
    for kind in ("layer", "functional", "unbiased"):
        layer = sbn.SyncBatchNorm(2, comm=comm, unbiased_running_var=kind == "unbiased")
        x = np.full((split[r], 2), 3.0, np.float32)
        before = (layer._mean.copy(), layer._variance.copy())
        try:
            if kind == "functional":
                sbn.functional.batch_norm_forward(
                    x, running_mean=layer._mean, running_var=layer._variance,
                    training=True, data_format="NC", comm=comm)
            else:
                layer(x)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        same = bool(np.array_equal(before[0], layer._mean)
                    and np.array_equal(before[1], layer._variance))
        # the layer goes on: a count of 2 works on every rank afterwards
        y = layer(np.ones((split[r] * 2, 2), np.float32) * [[1.0], [2.0]][: split[r] * 2]
                  if split[r] else np.zeros((0, 2), np.float32))
        out.append([list(split), kind, msg, same, bool(np.isfinite(y).all())])
every = comm.gather({"rank": r, "out": out})
if r == 0:
    print(json.dumps(every), flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_count_one_two_ranks_every_rank_raises(tmp_path, backend):
    res = run_mpi(SNIPPET, 2, timeout=180, tmp_path=tmp_path,
                  env={"CUPYSYNCBN_CPU_BACKEND": backend})
    lines = [json.loads(s) for s in res.stdout.splitlines() if s.startswith("[")][0]
    assert sorted(line["rank"] for line in lines) == [0, 1], res.stdout + res.stderr
    for line in lines:
        assert len(line["out"]) == 6
        for split, kind, msg, same, finite in line["out"]:
            assert re.search(MATCH, msg), (split, kind, msg)
            assert ("unbiased" in msg) == (kind == "unbiased"), msg
            assert same, (split, kind, "running stats changed")
            assert finite
