"""PyTorch's own BatchNorm samples (``module_db``) through the adapter, in one process.

The samples, the walk and its checks are in :mod:`support.torch_module_db`
(shared with the multi-rank jobs of ``test_torch_adapter.py`` and
``comm/test_torch_distributed.py``).
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")

from support.torch_module_db import CLASSES, check_walk, module_db_samples, walk  # noqa: E402


def test_module_db_has_the_batchnorm_samples():
    samples = module_db_samples()
    names = [s["name"] for s in samples]
    assert len(names) == len(set(names))
    assert len(samples) >= 22  # PyTorch 2.13: 8 + 7 + 7
    assert {s["cls"] for s in samples} == set(CLASSES)
    for must in ("affine_not_bias", "zero_batch", "simple_average", "not_tracking_stats"):
        assert any(must in n for n in names), must


def test_adapter_accepts_every_torch_batchnorm_argument():
    from cupysyncbn.interop import torch as ti

    ours = inspect.signature(ti.SyncBatchNorm).parameters
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d):
        missing = set(inspect.signature(cls).parameters) - set(ours)
        assert not missing, (cls.__name__, missing)
    theirs = inspect.signature(torch.nn.SyncBatchNorm).parameters
    assert set(theirs) - {"process_group"} <= set(ours) and "process_group" in ours


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: PyTorch's thread pool only adds latency (8x on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("forced", [False, True], ids=["local", "forced_collectives"])
def test_module_db_walk_one_process(forced, one_torch_thread):
    """All samples on one process; ``forced`` runs the whole synchronized path too."""
    from cupysyncbn.comm.base import NoCommunicator

    comm = NoCommunicator()
    comm.force_collectives = forced
    samples = module_db_samples()
    worst = check_walk(walk(samples, comm), samples)
    print(f"{len(samples)} samples, forced={forced}, worst:", worst)
