"""global_batch_size: the loss scale that makes uneven batches exact."""

import numpy as np
import pytest
from support.mpi_runner import run_mpi

import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL


def test_one_process_and_bad_arguments():
    assert sbn.global_batch_size(7, LOCAL) == 7
    assert sbn.global_batch_size(np.int64(0), LOCAL) == 0
    for bad, exc in ((True, TypeError), (2.0, TypeError), (-1, ValueError)):
        with pytest.raises(exc, match="n_local"):
            sbn.global_batch_size(bad, LOCAL)


@pytest.mark.mpi
def test_uneven_ranks_sum_and_the_rule_is_exact_where_averaging_is_not(tmp_path):
    """3/5/0 samples: the global-size rule gives one process's gradient; the
    per-rank-mean rule with averaged gradients does not."""
    code = """
import numpy as np
import cupysyncbn as sbn
comm = sbn.init()
r = comm.rank
x = np.random.default_rng(0).standard_normal((8, 3))
rows = [slice(0, 3), slice(3, 8), slice(8, 8)][r]
n = sbn.global_batch_size(x[rows].shape[0], comm)
assert n == 8, n
w = sbn.Parameter(np.ones(3))
# loss = mean over the global batch of (x . w)^2 / 2: gradient x^T (x w) / N
g_one = x.T @ (x @ w.data) / 8
w.accumulate_grad(x[rows].T @ (x[rows] @ w.data) / n)
sbn.allreduce_gradients([w], comm, average=False)
assert np.abs(w.grad - g_one).max() < 1e-12
m = max(x[rows].shape[0], 1)
v = sbn.Parameter(np.ones(3))
v.accumulate_grad(x[rows].T @ (x[rows] @ v.data) / m)
sbn.allreduce_gradients([v], comm, average=True)
assert np.abs(v.grad - g_one).max() > 1e-3  # biased with uneven batches
print("ok", r)
"""
    res = run_mpi(code, 3, timeout=90, tmp_path=tmp_path)
    assert res.stdout.count("ok") == 3
