"""Placement in one process: set_device/get_device, the rank -> GPU rule, new layers.

The CUDA device queries are answered by a stand-in (``fake_cupy``) with 0, 1
and 8 visible GPUs; the multi-rank behaviour (node-local rank, sub-groups,
backend agreement) is in ``test_placement_mpi.py``.
"""

import sys

import numpy as np
import pytest
from support import fake_cupy

import cupysyncbn as sbn
from cupysyncbn.comm.base import LOCAL
from cupysyncbn.errors import CommunicatorError
from cupysyncbn.runtime import env, placement

LAUNCH_VARS = (*env.LOCAL_RANK_VARS, "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
               "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMIX_SIZE", "MPI_LOCALNRANKS",
               "SLURM_NTASKS")


@pytest.fixture
def gpus(monkeypatch):
    """``install(ndev, **kw)``: a fake CuPy seeing ``ndev`` GPUs; placement forgotten."""
    saved = fake_cupy.save()
    for var in (*LAUNCH_VARS, env.DEVICE_ENV):
        monkeypatch.delenv(var, raising=False)
    placement._reset_for_tests()

    def install(ndev, **kw):
        placement._reset_for_tests()
        return fake_cupy.install(ndev, **kw)

    yield install
    fake_cupy.uninstall(saved)
    placement._reset_for_tests()


def test_parse_placement():
    assert placement.parse_placement("auto") == "auto"
    assert placement.parse_placement(" CPU ") == "cpu"
    assert placement.parse_placement("gpu") == "gpu"
    assert placement.parse_placement("cuda") == "gpu"
    assert placement.parse_placement("gpu:3") == "gpu:3"
    assert placement.parse_placement("cuda:12") == "gpu:12"
    assert placement.parse_placement("5") == "gpu:5"
    assert placement.parse_placement(2) == "gpu:2"
    for bad in ("tpu", "gpu:", "gpu:-1", "gpu:x", -1, True, None, 1.0):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'gpu' or 'gpu:N'"):
            placement.parse_placement(bad)


def test_choose_gpu_rule():
    assert placement.choose_gpu(1, 5) == 0  # one visible GPU: use it, whatever the rank
    assert placement.choose_gpu(8, 5) == 5
    assert placement.choose_gpu(8, 13) == 5  # 16 ranks on 8 GPUs: two per GPU
    assert placement.choose_gpu(2, 3) == 1
    assert placement.choose_gpu(8, None) == 0
    assert placement.choose_gpu(8, 5, forced=2) == 2  # CUPYSYNCBN_DEVICE / gpu:N wins
    assert placement.choose_gpu(1, 0, forced=0) == 0
    with pytest.raises(ValueError, match="GPU 2 was requested .* sees 2 GPU"):
        placement.choose_gpu(2, 0, forced=2)
    with pytest.raises(ValueError, match="no GPU"):
        placement.choose_gpu(0, 0)


def test_no_gpu_stays_numpy(gpus):
    gpus(0)
    assert placement.get_device() == "cpu"
    layer = sbn.SyncBatchNorm(3, comm=LOCAL)
    assert isinstance(layer.weight.data, np.ndarray) and isinstance(layer._mean, np.ndarray)
    with pytest.raises(ValueError, match="no GPU visible"):
        sbn.set_device("gpu")
    assert placement.requested() == "auto"  # unchanged after the error
    assert sbn.set_device("cpu") == "cpu"


def test_no_cupy_no_driver_is_cpu(monkeypatch, gpus):
    # Without CuPy in sys.modules and without libcuda, nothing is imported.
    sys.modules.pop("cupy", None)  # the fixture puts it back
    monkeypatch.setattr(placement, "_driver_present", lambda: False)
    placement._reset_for_tests()
    assert placement.visible_gpu_count() == 0
    assert placement.get_device() == "cpu"
    assert "cupy" not in sys.modules


def test_one_gpu_is_used_whatever_the_local_rank(gpus, monkeypatch):
    st = gpus(1)
    monkeypatch.setenv("MPI_LOCALRANKID", "3")  # e.g. Slurm --gpus-per-task=1
    assert placement.get_device() == "gpu:0"
    assert st.current == 0 and st.uses == [0]


def test_eight_gpus_by_node_local_rank(gpus, monkeypatch):
    st = gpus(8)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    assert placement.get_device() == "gpu:5"
    assert st.current == 5
    # chosen once: a later change of the variable does not move the process
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "6")
    assert placement.get_device() == "gpu:5"


def test_launcher_variable_order(gpus, monkeypatch):
    gpus(8)
    # mpiexec inside a Slurm allocation: the MPI launcher's variable wins
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("MPI_LOCALRANKID", "2")
    assert placement.node_local_rank() == 2


def test_env_device_wins_and_set_device_wins_over_env(gpus, monkeypatch):
    st = gpus(8)
    monkeypatch.setenv("MPI_LOCALRANKID", "5")
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "3")
    assert placement.get_device() == "gpu:3"
    assert sbn.set_device("gpu:6") == "gpu:6"
    assert st.current == 6 and sbn.get_device() == "gpu:6"
    with pytest.raises(ValueError, match="GPU 9 was requested .* sees 8 GPU"):
        sbn.set_device("gpu:9")
    assert sbn.get_device() == "gpu:6" and st.current == 6  # nothing changed
    assert sbn.set_device("cpu") == "cpu"


def test_bad_env_device(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "gpu:7")
    with pytest.raises(ValueError, match="GPU 7 was requested"):
        placement.get_device()
    with pytest.raises(CommunicatorError, match="rank 0: GPU 7 was requested"):
        sbn.init("auto")  # one process: no MPI needed for the error either
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "tpu")
    with pytest.raises(ValueError, match="CUPYSYNCBN_DEVICE must be"):
        placement.get_device()


def test_env_cpu(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "cpu")
    assert placement.get_device() == "cpu"
    assert isinstance(sbn.SyncBatchNorm(2, comm=LOCAL).weight.data, np.ndarray)


def test_new_layers_live_on_this_ranks_gpu(gpus, monkeypatch):
    st = gpus(8)
    monkeypatch.setenv("MPI_LOCALRANKID", "4")
    cp = sys.modules["cupy"]
    for layer in (sbn.SyncBatchNorm(3, comm=LOCAL), sbn.BatchNorm2D(3)):
        for arr in (layer.weight.data, layer.bias.data, layer._mean, layer._variance):
            assert isinstance(arr, cp.ndarray) and arr.device.id == 4
        np.testing.assert_array_equal(layer._variance.get(), np.ones(3, np.float32))
    assert st.current == 4
    # Mixing NumPy input with a GPU layer: a TypeError naming both libraries.
    layer = sbn.SyncBatchNorm(3, comm=LOCAL)
    with pytest.raises(TypeError, match=r"must be a numpy array like x; got cupy\.ndarray"):
        layer(np.ones((2, 3, 2, 2), np.float32))
    # .to('cpu') brings it back; it then computes on NumPy arrays.
    layer.to("cpu")
    y = layer(np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2))
    assert isinstance(y, np.ndarray) and abs(float(y.mean())) < 1e-6


def test_gpu_input_on_cpu_layer_names_both(gpus, monkeypatch):
    # The reverse mix: a (fake) CuPy input on a NumPy layer.
    from cupysyncbn.backends.cupy import backend as cupy_backend

    gpus(1)
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "cpu")
    layer = sbn.SyncBatchNorm(3, comm=LOCAL)
    x = sys.modules["cupy"].array(np.ones((2, 3), np.float32))
    layer_nc = sbn.SyncBatchNorm(3, comm=LOCAL, data_format="NC")
    assert isinstance(layer.weight.data, np.ndarray)
    cupy_backend.get_cupy_backend.cache_clear()
    try:
        with pytest.raises(TypeError, match=r"must be a cupy array like x; got numpy\.ndarray"):
            layer_nc(x)
    finally:
        cupy_backend.get_cupy_backend.cache_clear()  # forget the stand-in's backend


def test_move_resets_sync_state(gpus, monkeypatch):
    # A CPU-trained layer moved to a GPU must not keep its NumPy shift/buffers.
    gpus(8)
    monkeypatch.setenv("CUPYSYNCBN_DEVICE", "cpu")
    comm = sbn.init("none", force_collectives=True)
    layer = sbn.SyncBatchNorm(3, comm=comm)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layer(x)
    layer.backward(x)
    st = layer._sync_state
    assert st.shift is not None and st.handshake_done and st._buffers
    layer.to("cpu", dtype="float64")  # same device: the state stays
    assert st.shift is not None and st.handshake_done
    layer.to("cuda:2")
    assert st.shift is None and not st.handshake_done and not st._buffers
    assert layer._mean.device.id == 2
    layer.to("cpu")  # and back: a fresh synchronized pass gives the right answer
    y = layer(x)
    ref = sbn.SyncBatchNorm(3, comm=LOCAL, dtype="float64")
    np.testing.assert_allclose(y, ref(x), atol=1e-6)
    sbn.set_default_comm(None)


def test_import_is_light():
    # import cupysyncbn imports neither CuPy nor mpi4py (checked in a fresh process).
    import subprocess

    code = ("import sys, cupysyncbn; bad = [m for m in ('cupy', 'mpi4py', 'torch')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_verbose_line_one_process(gpus, monkeypatch, capsys):
    gpus(8)
    monkeypatch.setenv("CUPYSYNCBN_VERBOSE", "1")
    try:
        comm = sbn.init("auto")  # one process: no MPI, placed all the same
        assert comm.backend == "none"
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["cupysyncbn: backend=none ranks=1 gpus_per_node=8 ranks_per_gpu=1"
                       " nccl=2.18.5 rank0_device=gpu:0"]
        sbn.init("none", force_collectives=True)
        assert capsys.readouterr().err.strip().endswith("force_collectives=1")
        monkeypatch.setenv("CUPYSYNCBN_VERBOSE", "0")
        sbn.init("auto")
        assert capsys.readouterr().err == ""
    finally:
        sbn.set_default_comm(None)
