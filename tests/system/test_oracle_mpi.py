"""The four-way oracle on 2, 3 and 4 real MPI ranks (one mpiexec launch per K).

K = 1 runs the same checks on one rank with forced collectives (the whole
synchronized path through the communicator, as on a one-GPU machine).

SyncBatchNorm on K ranks with uneven splits (some ranks empty, non-contiguous
shards) must equal local BN on the whole batch in one process and the float64
NumPy reference, for every data format and float16/32/64 inputs; local BN on
the same split must differ. The same launch checks bitwise-identical running
statistics, sub-groups, the number and size of collectives, empty batches and
``allreduce_gradients``. The checks themselves live in ``mpi_cases.py``.

Every test runs for both CPU backends (``CUPYSYNCBN_CPU_BACKEND=numba`` and
``numpy``, the documented fallback): each has its own cross-rank merge,
checked here against the float64 reference on the global batch.
"""

import pytest
from support.bn_ref import check_group

pytestmark = pytest.mark.mpi
KS = [1, 2, 3, 4]  # 1: one rank with forced collectives (conftest.mpi_job)
FORMATS = ["NC", "NCL", "NCHW", "NCDHW", "NLC", "NHWC", "NDHWC"]


@pytest.fixture(params=["numba", "numpy"])
def oracle(request, mpi_job):
    """``oracle(k)``: the oracle job's checks on ``k`` ranks with this CPU backend."""
    def get(k):
        res = mpi_job("oracle", k, request.param)
        check_group(res, f"oracle: the CPU backend is {request.param} ", min_count=1)
        return res
    return get


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dt", ["float32/float32", "float64/float64"])
def test_sync_equals_local_on_whole_batch(oracle, k, fmt, dt):
    # y, dx, summed grads, running stats, eval y vs local BN and float64 ref,
    # dtype kept, local-on-split differs, bitwise-identical running stats.
    # (one rank has no "local BN on the split differs" check)
    check_group(oracle(k), f"oracle {fmt}/{dt} ", min_count=13 if k > 1 else 12)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case", [
    "NCHW/float16/float32",  # float16 input, float32 statistics
    "NHWC/float32/float64",  # float32 input, float64 layer
    "NCL/float64/float32",  # float64 input, float32 layer
    "NCHW/float64/float64 momentum=None unbiased",
    "NCDHW/float64/float64 track_running_stats=False",
])
def test_mixed_dtypes_and_options(oracle, k, case):
    check_group(oracle(k), f"oracle {case} ", min_count=8)


@pytest.mark.parametrize("k", KS)
def test_bitwise_identical_running_stats(oracle, k):
    check_group(oracle(k), "oracle", min_count=200)
    res = oracle(k)
    assert sum("bitwise identical" in name for name in res) >= 18


@pytest.mark.parametrize("k", KS)
def test_one_collective_per_pass(oracle, k):
    check_group(oracle(k), "collectives:", min_count=8)


@pytest.mark.parametrize("k", KS)
def test_empty_batches(oracle, k):
    check_group(oracle(k), "empty global batch", min_count=8)
    check_group(oracle(k), "one non-empty rank", min_count=2)


@pytest.mark.parametrize("k", KS)
def test_allreduce_gradients(oracle, k):
    check_group(oracle(k), "allreduce_gradients", min_count=3)


def test_subgroups_independent(oracle):
    # 4 ranks, two groups of 2 (MPICommunicator.split and a raw mpi4py Split).
    check_group(oracle(4), "subgroup (split)", min_count=6)
    check_group(oracle(4), "subgroup (mpi4py)", min_count=6)
