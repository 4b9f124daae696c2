"""Checkpoint file mode: ``save`` honours the umask like ``numpy.save`` and stays atomic."""

import os
import stat

import numpy as np
import pytest

import cupysyncbn as sbn


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask):
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_honours_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "bn.npz"
    sbn.save(sbn.SyncBatchNorm(3).state_dict(), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    np.save(tmp_path / "ref.npy", np.zeros(1))  # what numpy itself does
    assert stat.S_IMODE(os.stat(tmp_path / "ref.npy").st_mode) == mode
    # overwriting (atomic rename of a fresh temporary) gives the same mode
    sbn.save({"w": np.ones(2)}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert sorted(os.listdir(tmp_path)) == ["bn.npz", "ref.npy"]  # no temporary left
    np.testing.assert_array_equal(sbn.load(path)["w"], np.ones(2))
