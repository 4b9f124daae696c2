"""Checkpoints: .npz round trips, never pickle, atomic writes, all-or-nothing loads."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
from support.mpi_runner import run_mpi

import cupysyncbn as sbn
from cupysyncbn import checkpoint as sio
from cupysyncbn.errors import CheckpointError


def _trained_model(rng, momentum=0.9):
    model = sbn.Sequential(
        sbn.BatchNorm2D(3, momentum=momentum), sbn.BatchNorm2D(3, momentum=momentum)
    )
    for _ in range(3):
        y = model(rng.standard_normal((4, 3, 2, 2)).astype(np.float32) * 3 + 1)
        for layer in reversed(model.sublayers()):
            y = layer.backward(np.ones_like(y))
    model[0].weight.data = model[0].weight.data * 2 + 0.5
    return model


def _snapshot(model):
    # (object identity, bitwise copy) of every state entry
    return {k: (id(v), np.array(v, copy=True)) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    now = model.state_dict()
    assert list(now) == list(snap)
    for k, (ident, value) in snap.items():
        assert id(now[k]) == ident, k
        assert now[k].dtype == value.dtype and np.array_equal(now[k], value), k


def test_round_trip_bitwise(tmp_path, rng):
    model = _trained_model(rng)
    path = tmp_path / "ckpt.npz"
    sbn.save(model.state_dict(), path)
    loaded = sbn.load(path)
    assert list(loaded) == list(model.state_dict())
    fresh = sbn.Sequential(sbn.BatchNorm2D(3), sbn.BatchNorm2D(3))
    fresh.set_state_dict(loaded)
    for k, v in model.state_dict().items():
        assert np.array_equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype
    x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
    model.eval(), fresh.eval()
    assert np.array_equal(model(x), fresh(x))
    # the file is a plain npz, readable without cupysyncbn and without pickle
    # (the manifest lives in zip comments, which np.load ignores)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(model.state_dict())
        for k, v in model.state_dict().items():
            assert z[k].dtype == v.dtype and np.array_equal(z[k], v), k


def test_momentum_none_saves_counter(tmp_path, rng):
    model = _trained_model(rng, momentum=None)
    sd = model.state_dict()
    assert "0._num_batches_tracked" in sd
    sbn.save(sd, tmp_path / "c.npz")
    loaded = sbn.load(tmp_path / "c.npz")
    assert int(loaded["0._num_batches_tracked"]) == 3
    fresh = sbn.Sequential(sbn.BatchNorm2D(3, momentum=None), sbn.BatchNorm2D(3, momentum=None))
    fresh.set_state_dict(loaded)
    assert int(fresh[0]._num_batches_tracked) == 3


def test_pytorch_named_state_dict_loads(tmp_path):
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm2d(3, momentum=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        tbn(torch.randn(4, 3, 5, 5, generator=g) * 2 + 1)
    with torch.no_grad():
        tbn.weight.mul_(1.5)
    sd = {k: v.detach().numpy() for k, v in tbn.state_dict().items()}
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    sbn.save(sd, tmp_path / "torch.npz")
    layer = sbn.SyncBatchNorm(3, momentum=0.9, unbiased_running_var=True)
    layer.set_state_dict(sbn.load(tmp_path / "torch.npz"))
    np.testing.assert_array_equal(layer._mean, tbn.running_mean.numpy())
    np.testing.assert_array_equal(layer._variance, tbn.running_var.numpy())
    np.testing.assert_array_equal(layer.weight.data, tbn.weight.detach().numpy())
    # and the eval outputs agree with PyTorch's
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    tbn.eval(), layer.eval()
    want = tbn(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(layer(x), want, atol=1e-5, rtol=1e-5)


class _Evil:
    """Unpickling this would create a marker file: proves load never unpickles."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_array_checkpoint_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    obj = np.empty(1, dtype=object)
    obj[0] = evil
    path = tmp_path / "evil.npz"
    np.savez(path, weight=np.ones(3, np.float32), payload=obj)  # numpy pickles it
    with pytest.raises(CheckpointError, match="'payload' is an object array.*never"):
        sbn.load(path)
    with pytest.raises(ValueError, match="pickle"):  # CheckpointError is a ValueError
        sbn.load(path)
    assert not marker.exists()


def test_save_refuses_non_numeric(tmp_path):
    path = tmp_path / "x.npz"
    bad = {"weight": np.ones(2), "names": np.array(["a", "b"])}
    with pytest.raises(TypeError, match=r"state_dict\['names'\].*numeric"):
        sbn.save(bad, path)
    with pytest.raises(TypeError, match=r"state_dict\['o'\]"):
        sbn.save({"o": np.array([object()], dtype=object)}, path)
    with pytest.raises(TypeError, match="keys must be"):
        sbn.save({1: np.ones(2)}, path)
    with pytest.raises(TypeError, match="pass layer.state_dict"):
        sbn.save(sbn.BatchNorm1D(2), path)
    with pytest.raises(TypeError, match="path must be"):
        sbn.save({"a": np.ones(1)}, 3)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "text", "npy", "pickle"])
def test_corrupt_file_clear_error(tmp_path, rng, damage):
    path = tmp_path / "c.npz"
    sbn.save(_trained_model(rng).state_dict(), path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        # corrupt array data inside the archive (stored uncompressed: CRC catches it)
        with zipfile.ZipFile(path) as z:
            info = z.infolist()[-1]
        start = info.header_offset + 30 + len(info.filename) + 80
        corrupted = bytearray(raw)
        corrupted[start : start + 4] = bytes(b ^ 0xFF for b in corrupted[start : start + 4])
        path.write_bytes(bytes(corrupted))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("weight = [1, 2, 3]\n")
    elif damage == "npy":
        np.save(open(path, "wb"), np.ones(3))
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"weight": np.ones(3)}))
    with pytest.raises(CheckpointError, match=str(path.name)) as info:
        sbn.load(path)
    msg = str(info.value)
    assert any(w in msg for w in ("truncated or corrupt", "empty file", "not an .npz", ".npy"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        sbn.load(tmp_path / "nope.npz")


def test_failure_between_write_and_rename_keeps_old_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "c.npz"
    old = {"w": np.arange(4.0)}
    sbn.save(old, path)
    before = path.read_bytes()

    def crash(src, dst):
        assert os.path.getsize(src) > 0  # the new archive is complete, not yet renamed
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(sio.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        sbn.save({"w": np.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]  # temporary file removed
    np.testing.assert_array_equal(sbn.load(path)["w"], old["w"])


def test_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    sbn.save({"w": np.arange(4.0)}, path)
    before = path.read_bytes()

    def broken_write(f, arrays):
        f.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(sio, "_write_archive", broken_write)
    with pytest.raises(OSError, match="disk full"):
        sbn.save({"w": np.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def test_rejected_state_dict_leaves_model_unchanged(rng):
    model = _trained_model(rng)
    snap = _snapshot(model)
    good = {k: np.array(v, copy=True) + 1 for k, v in model.state_dict().items()}
    cases = []
    bad = dict(good)
    bad["1._variance"] = np.ones(4, np.float32)  # last entry: wrong shape
    cases.append((bad, ValueError, r"1\._variance.*shape"))
    bad = dict(good)
    bad["1.bias"] = good["1.bias"].astype(np.float64)  # wrong dtype
    cases.append((bad, TypeError, r"1\.bias.*dtype float64"))
    bad = dict(good)
    del bad["0._mean"]  # missing
    cases.append((bad, ValueError, r"missing.*0\._mean"))
    bad = dict(good)
    bad["2.weight"] = np.ones(3, np.float32)  # unexpected
    cases.append((bad, ValueError, r"unexpected.*2\.weight"))
    bad = dict(good)
    bad["0.weight"] = "not an array"
    cases.append((bad, (TypeError, ValueError), r"0\.weight"))
    for sd, etype, pattern in cases:
        with pytest.raises(etype, match=pattern):
            model.set_state_dict(sd)
        _assert_unchanged(model, snap)
    # a corrupt file fails in load(), before the model is touched
    model.set_state_dict(good)
    for k, v in model.state_dict().items():
        assert np.array_equal(v, good[k])


COLLECTIVE = r"""
import os, sys
import numpy as np
import cupysyncbn as sbn
from cupysyncbn import checkpoint as sio
from cupysyncbn.errors import RemoteInputError

sbn.install_abort_hook()
comm = sbn.init("mpi")
rank = comm.rank
say = lambda msg: os.write(1, (msg + "\n").encode())  # one write: lines never interleave
folder = sys.argv[1]
path = os.path.join(folder, "model.npz")
writes = []
real = sio._atomic_write
sio._atomic_write = lambda arrays, p: (writes.append(p), real(arrays, p))

# every rank holds its own values; the file gets rank 0's, written once
sd = {"w": np.full(3, float(rank)), "n": np.array(rank)}
sbn.save(sd, path, comm=comm)
assert os.path.exists(path)  # in place on every rank when save returns
assert len(writes) == (1 if rank == 0 else 0), writes
np.testing.assert_array_equal(sbn.load(path)["w"], np.zeros(3))
say(f"OK collective {rank}")

# an invalid state dict on one rank: every rank raises, nothing is written
before = open(path, "rb").read()
bad = {"w": np.array(["x"])} if rank == 1 else sd
try:
    sbn.save(bad, path, comm=comm)
    raise AssertionError("no error")
except TypeError as e:
    assert rank == 1, e
except RemoteInputError as e:
    assert rank != 1 and "invalid state_dict" in str(e), e
assert open(path, "rb").read() == before
say(f"OK invalid {rank}")

# rank 0's path is a FIFO: refused before anything is written, on every rank
fifo = os.path.join(folder, "pipe.npz")
if rank == 0:
    os.mkfifo(fifo)
try:
    sbn.save(sd, fifo if rank == 0 else None, comm=comm)
    raise AssertionError("no error")
except RemoteInputError as e:
    assert rank != 0 and "invalid state_dict or path" in str(e), e
except ValueError as e:
    assert rank == 0 and "is a FIFO" in str(e), e
if rank == 0:
    import stat
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    os.unlink(fifo)
say(f"OK fifo {rank}")

# rank 0 fails to write: every rank raises, the old file stays
if rank == 0:
    sio.os.replace = lambda a, b: (_ for _ in ()).throw(OSError("simulated rename failure"))
try:
    sbn.save(sd, path, comm=comm)
    raise AssertionError("no error")
except OSError as e:
    assert "rename failure" in str(e) or "could not write" in str(e), e
assert open(path, "rb").read() == before
say(f"OK write-failure {rank}")

# finally rank 0 crashes hard between write and rename (no cleanup, no
# exception): the job ends, the old checkpoint is intact (checked by the test)
if rank == 0:
    sio.os.replace = lambda a, b: os._exit(3)
sbn.save({"w": np.full(3, 99.0), "n": np.array(0)}, path, comm=comm)
say(f"UNREACHABLE {rank}")
"""


@pytest.mark.mpi
def test_collective_save_and_crash_safety(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    res = run_mpi(COLLECTIVE, 3, timeout=60, tmp_path=tmp_path, check=False,
                  args=(str(folder),), env={"CUPYSYNCBN_TIMEOUT": "20"})
    out = res.stdout + res.stderr
    for case in ("collective", "invalid", "fifo", "write-failure"):
        for r in range(3):
            assert f"OK {case} {r}" in res.stdout, out
    assert res.returncode != 0 and "UNREACHABLE" not in out, out
    # the crash left the previous checkpoint intact (and maybe a temp file)
    loaded = sbn.load(folder / "model.npz")
    np.testing.assert_array_equal(loaded["w"], np.zeros(3))
    leftovers = [f for f in os.listdir(folder) if f != "model.npz"]
    assert all(f.startswith(".sbn-") and f.endswith(".tmp") for f in leftovers), leftovers


# ---- issue 14: checkpoint hardening ------------------------------------------


@pytest.mark.parametrize("key", ["allow_pickle", "file", "a/b", "x.npy", "ünï cödé", "a.b",
                                 "-", " lead space", "../up", "back\\slash"])
def test_any_key_round_trips(tmp_path, key):
    sd = {key: np.arange(4, dtype=np.float32), "other": np.ones(2)}
    sbn.save(sd, tmp_path / "k.npz")
    back = sbn.load(tmp_path / "k.npz")
    assert list(back) == [key, "other"]
    np.testing.assert_array_equal(back[key], sd[key])
    # numpy reads our archives too (same layout as np.savez)
    with np.load(tmp_path / "k.npz") as z:
        np.testing.assert_array_equal(z[key], sd[key])


@pytest.mark.parametrize("key", ["nul\x00byte"])
def test_keys_zip_cannot_hold_are_refused_by_name(tmp_path, key):
    import re

    with pytest.raises(ValueError, match=re.escape(repr(key))):
        sbn.save({key: np.ones(2)}, tmp_path / "k.npz")
    assert not (tmp_path / "k.npz").exists()


def test_torch_save_file_is_a_checkpoint_error(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"weight": torch.ones(3)}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="not a cupysyncbn checkpoint.*torch"):
        sbn.load(tmp_path / "t.pt")


def test_zip_with_other_members_is_a_checkpoint_error(tmp_path):
    p = tmp_path / "mixed.npz"
    np.savez(p, w=np.ones(3))
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("README.txt", "hello")
    with pytest.raises(CheckpointError, match="README.txt"):
        sbn.load(p)


def test_header_declaring_more_than_the_data_is_refused_without_allocating(tmp_path):
    import io as _io
    import tracemalloc

    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    buf.write(np.ones(4).tobytes())
    p = tmp_path / "forged.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("w.npy", buf.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="declares shape.*truncated or forged"):
            sbn.load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20  # 8 TB declared; nothing near it allocated


def test_truncated_member_is_a_checkpoint_error(tmp_path):
    buf = __import__("io").BytesIO()
    np.lib.format.write_array(buf, np.arange(100.0))
    p = tmp_path / "short.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("w.npy", buf.getvalue()[:-8])
    with pytest.raises(CheckpointError, match="'w'"):
        sbn.load(p)


def test_long_valid_file_name_saves(tmp_path):
    name = "m" * 240 + ".npz"  # valid (NAME_MAX 255); the old temp name was not
    sbn.save({"w": np.ones(3)}, tmp_path / name)
    np.testing.assert_array_equal(sbn.load(tmp_path / name)["w"], np.ones(3))
    assert os.listdir(tmp_path) == [name]


def test_big_endian_arrays_save_load_and_set_state_dict(tmp_path):
    layer = sbn.SyncBatchNorm(3, comm=sbn.comm.base.LOCAL)
    sd = {k: np.asarray(v).astype(np.asarray(v).dtype.newbyteorder(">"))
          for k, v in layer.state_dict().items()}
    sd["weight"] = np.array([1.0, 2.0, 3.0], ">f4")
    sbn.save(sd, tmp_path / "be.npz")
    back = sbn.load(tmp_path / "be.npz")
    assert all(v.dtype.isnative for v in back.values())
    layer.set_state_dict(sd)  # big-endian in memory is accepted too
    np.testing.assert_array_equal(layer.weight.data, [1.0, 2.0, 3.0])
    assert layer.weight.data.dtype == np.float32 and layer.weight.data.dtype.isnative


@pytest.mark.parametrize("bad", [np.array(-1), np.array(2**63 + 5, dtype=np.uint64),
                                 np.array(-(2**40))])
def test_num_batches_tracked_is_validated(bad):
    layer = sbn.SyncBatchNorm(3, momentum=None, data_format="NC", comm=sbn.comm.base.LOCAL)
    sd = layer.state_dict()
    before = _snapshot(layer)
    sd["_num_batches_tracked"] = bad
    with pytest.raises(ValueError, match="_num_batches_tracked.*integer in"):
        layer.set_state_dict(sd)
    _assert_unchanged(layer, before)
    sd["_num_batches_tracked"] = np.array(7, dtype=np.uint64)
    layer.set_state_dict(sd)
    assert int(layer._num_batches_tracked) == 7
    layer(np.ones((2, 3), np.float32))  # the next forward divides by 7 + 1
    assert int(layer._num_batches_tracked) == 8


def test_dotted_sublayer_names_are_refused():
    model = sbn.Sequential()
    with pytest.raises(ValueError, match="'a.b'"):
        model.add_sublayer("a.b", sbn.BatchNorm1D(2))
    with pytest.raises(ValueError, match="'a.b'"):
        setattr(model, "a.b", sbn.BatchNorm1D(2))
    with pytest.raises(ValueError, match="'x.y'"):
        sbn.Sequential(("x.y", sbn.BatchNorm1D(2)))
    # the colliding layout of the issue can no longer be built, so every key of
    # a state dict names exactly one entry
    inner = sbn.Sequential(("b", sbn.BatchNorm1D(2)))
    model = sbn.Sequential(("a", inner), ("ab", sbn.BatchNorm1D(2)))
    sd = model.state_dict()
    assert len(sd) == len(set(sd)) == 8


# ---- issue 23: what save() replaces; issue 27: durability --------------------


def _no_temp_files(*folders):
    return all(not f.startswith(".sbn-") for d in folders for f in os.listdir(d))


@pytest.fixture
def renames(monkeypatch):
    """Records (source folder, destination) of every os.replace in checkpoint."""
    done = []
    real = os.replace

    def replace(src, dst):
        done.append((os.path.dirname(src), os.fspath(dst)))
        real(src, dst)

    monkeypatch.setattr(sio.os, "replace", replace)
    return done


@pytest.mark.skipif(os.name != "posix", reason="POSIX symlinks")
def test_save_writes_through_a_symlink_atomically(tmp_path, renames):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir(), link_dir.mkdir()
    target = real_dir / "t.npz"
    sbn.save({"w": np.zeros(2)}, target)
    renames.clear()
    link = link_dir / "l.npz"
    link.symlink_to(os.path.relpath(target, link_dir))  # relative: resolved from its folder
    chain = link_dir / "chain.npz"
    chain.symlink_to("l.npz")
    sbn.save({"w": np.ones(2)}, chain)
    # both links are still links to the same place; the target holds the new data
    assert chain.is_symlink() and os.readlink(chain) == "l.npz"
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "real", "t.npz")
    assert not target.is_symlink()
    np.testing.assert_array_equal(sbn.load(target)["w"], np.ones(2))
    np.testing.assert_array_equal(sbn.load(chain)["w"], np.ones(2))
    # the temporary was made in the target's folder and renamed onto the target
    assert renames == [(os.path.realpath(real_dir), os.path.realpath(target))]
    assert _no_temp_files(real_dir, link_dir)
    assert sorted(os.listdir(link_dir)) == ["chain.npz", "l.npz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX symlinks")
def test_save_through_a_dangling_symlink_creates_its_target(tmp_path, renames):
    (tmp_path / "real").mkdir()
    link = tmp_path / "l.npz"
    link.symlink_to(tmp_path / "real" / "new.npz")
    sbn.save({"w": np.arange(3.0)}, link)
    assert link.is_symlink()
    np.testing.assert_array_equal(sbn.load(tmp_path / "real" / "new.npz")["w"], np.arange(3.0))
    assert renames == [(os.path.realpath(tmp_path / "real"),
                        os.path.realpath(tmp_path / "real" / "new.npz"))]
    # ... as numpy.save does; a target folder that does not exist is an error
    (tmp_path / "np.npy").symlink_to(tmp_path / "real" / "np-new.npy")
    np.save(tmp_path / "np.npy", np.ones(1))
    assert (tmp_path / "real" / "np-new.npy").is_file()
    bad = tmp_path / "bad.npz"
    bad.symlink_to(tmp_path / "missing" / "x.npz")
    with pytest.raises(FileNotFoundError):
        sbn.save({"w": np.ones(1)}, bad)
    assert not (tmp_path / "missing").exists() and bad.is_symlink()


def _refused(path, etype, pattern, monkeypatch):
    made = []
    monkeypatch.setattr(sio, "_create_temp", lambda *a: made.append(a))  # must not be reached
    with pytest.raises(etype, match=pattern):
        sbn.save({"w": np.ones(2)}, path)
    monkeypatch.undo()
    assert made == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_save_refuses_fifo_device_and_directory_targets(tmp_path, monkeypatch):
    import re
    import stat

    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    _refused(fifo, ValueError, "pipe.npz' is a FIFO.*only ever replace regular files",
             monkeypatch)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    to_fifo = tmp_path / "to_fifo.npz"
    to_fifo.symlink_to(fifo)
    _refused(to_fifo, ValueError, re.escape(f"(-> '{fifo}') is a FIFO"), monkeypatch)
    # a device node: as root this used to replace the system's /dev/null
    _refused("/dev/null", ValueError, "'/dev/null' is a character device", monkeypatch)
    to_null = tmp_path / "null.npz"
    to_null.symlink_to("/dev/null")
    _refused(to_null, ValueError, "character device", monkeypatch)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # directories: given, through a link, or by a trailing separator
    folder = tmp_path / "dir.npz"
    folder.mkdir()
    _refused(folder, IsADirectoryError, "dir.npz' is a directory", monkeypatch)
    to_dir = tmp_path / "to_dir"
    to_dir.symlink_to(folder)
    _refused(to_dir, IsADirectoryError, "is a directory", monkeypatch)
    _refused(str(tmp_path / "new") + os.sep, IsADirectoryError, "trailing separator",
             monkeypatch)
    assert not (tmp_path / "new").exists()
    loop = tmp_path / "loop.npz"
    loop.symlink_to("loop2.npz")
    (tmp_path / "loop2.npz").symlink_to("loop.npz")
    _refused(loop, OSError, "symlink loop", monkeypatch)
    _refused("", ValueError, "path must not be empty", monkeypatch)
    assert folder.is_dir() and os.listdir(folder) == []
    assert _no_temp_files(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_target_replaced_by_a_fifo_during_the_write_is_not_renamed_over(tmp_path,
                                                                        monkeypatch):
    import stat

    path = tmp_path / "c.npz"
    sbn.save({"w": np.zeros(2)}, path)
    real_write = sio._write_archive

    def write_then_swap(f, arrays):
        real_write(f, arrays)
        os.unlink(path)
        os.mkfifo(path)

    monkeypatch.setattr(sio, "_write_archive", write_then_swap)
    with pytest.raises(ValueError, match="is a FIFO"):
        sbn.save({"w": np.ones(2)}, path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert os.listdir(tmp_path) == ["c.npz"]  # temporary removed


@pytest.mark.parametrize("key", ["\udc80", "ok\ud800tail"])
def test_lone_surrogate_key_is_refused_by_name(tmp_path, key):
    import re

    sd = {"first": np.ones(2), key: np.ones(2)}
    with pytest.raises(ValueError, match=re.escape(repr(key)) + ".*lone surrogate"):
        sbn.save(sd, tmp_path / "k.npz")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="directory fsync is POSIX")
@pytest.mark.parametrize("via_symlink", [False, True])
def test_file_and_folder_are_fsynced_around_the_rename(tmp_path, monkeypatch, via_symlink):
    import stat

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "c.npz"
    path = target
    if via_symlink:
        path = tmp_path / "link.npz"
        path.symlink_to(target)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        events.append(("fsync", kind, st.st_ino, st.st_size if kind == "file" else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(sio.os, "fsync", fsync)
    monkeypatch.setattr(sio.os, "replace", replace)
    sbn.save({"w": np.arange(5.0)}, path)
    monkeypatch.undo()
    st = os.stat(target)
    # the complete file (flushed: its full size) is synced before the rename,
    # the folder that holds the new name after it (the folder of the link's
    # target, not of the link)
    assert events == [
        ("fsync", "file", st.st_ino, st.st_size),
        ("replace", st.st_ino),
        ("fsync", "dir", os.stat(real_dir).st_ino, None),
    ]
