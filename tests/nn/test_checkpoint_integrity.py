"""Checkpoint integrity: any corruption that drops or changes an entry raises.

A damaged central-directory record can make ``zipfile`` stop early and return
some of the entries without error; ``load`` cross-checks the entry count with
the zip's end record and every member with the archive's manifest (keys,
dtypes, shapes, sizes, SHA-256), which lives in the zip's comment fields.
"""

from __future__ import annotations

import json
import random
import struct
import zipfile

import numpy as np
import pytest

import cupysyncbn as sbn
from cupysyncbn import checkpoint as sio
from cupysyncbn.errors import CheckpointError


def _state():
    return {"weight": np.array([1.0, 2.0, 3.0], np.float32),
            "bias": np.zeros(3, np.float32),
            "_mean": np.arange(3.0),
            "_num_batches_tracked": np.array(7, np.int64)}


def _write_previous_version(path, arrays):
    # the archive the previous cupysyncbn wrote: one stored .npy member per
    # key, no manifest
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, arr in arrays.items():
            with z.open(key + ".npy", "w", force_zip64=True) as m:
                np.lib.format.write_array(m, arr, allow_pickle=False)


def _same(a, b):
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].tobytes() == b[k].tobytes() for k in a)


def _central_directory(raw):
    eocd = raw.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<LL", raw[eocd + 12: eocd + 20])
    return offset, size, eocd


def _sweep(tmp_path, raw, bits):
    """Load ``raw`` with each corruption; count identical loads and CheckpointErrors."""
    ref = sbn.load(_put(tmp_path / "ref.npz", raw))
    path = tmp_path / "c.npz"
    counts = {"identical": 0, "CheckpointError": 0}
    other = []

    def trial(data, what):
        path.write_bytes(data)
        try:
            got = sbn.load(path)
        except CheckpointError:
            counts["CheckpointError"] += 1
            return
        except Exception as e:  # noqa: BLE001 - the defect this test looks for
            other.append((what, repr(e)))
            return
        if _same(got, ref):
            counts["identical"] += 1
        else:
            other.append((what, "a different dict", {k: v.shape for k, v in got.items()}))

    for i in bits:
        flipped = bytearray(raw)
        flipped[i // 8] ^= 1 << (i % 8)
        trial(bytes(flipped), ("flip bit", i))
    return counts, other, trial


def _put(path, raw):
    path.write_bytes(raw)
    return path


def test_corruption_sweep_never_returns_a_different_dict(tmp_path):
    """Every bit of the central directory and end record, every truncation,
    a sample of bits elsewhere: an identical load or CheckpointError, nothing else."""
    sbn.save(_state(), tmp_path / "s.npz")
    raw = (tmp_path / "s.npz").read_bytes()
    cd_offset, _, _ = _central_directory(raw)
    tail = range(cd_offset * 8, len(raw) * 8)
    elsewhere = random.Random(0).sample(range(cd_offset * 8), 500)
    counts, other, trial = _sweep(tmp_path, raw, [*tail, *elsewhere])
    assert other == []
    flips = dict(counts)
    for n in range(len(raw)):
        trial(raw[:n], ("truncate to", n))
    assert other == []
    print(f"\n{len(tail) + len(elsewhere)} bit flips: {flips};"
          f" with {len(raw)} truncations: {counts}")
    assert sum(counts.values()) == len(tail) + len(elsewhere) + len(raw)
    # every truncation is refused; some flips change nothing the dict holds
    # (a zip flag, a timestamp, the local header's copy of a size)
    assert counts["CheckpointError"] - flips["CheckpointError"] == len(raw)
    assert flips["identical"] > 0 and flips["CheckpointError"] > len(tail) // 2


def test_previous_version_files_sweep_of_the_central_directory(tmp_path):
    # without a manifest only the entry count guards against dropped entries
    _write_previous_version(tmp_path / "old.npz", _state())
    raw = (tmp_path / "old.npz").read_bytes()
    cd_offset, _, _ = _central_directory(raw)
    counts, other, _ = _sweep(tmp_path, raw, range(cd_offset * 8, len(raw) * 8))
    assert other == []
    print(f"\nprevious version, {(len(raw) - cd_offset) * 8} bit flips: {counts}")
    assert counts["identical"] > 0 and counts["CheckpointError"] > 0


def _drop_entries_by_comment_length(raw, record):
    """Set a high bit of one central-directory record's comment length.

    zipfile then skips past the end of the directory and stops early, without
    error: the issue's "2 of 4 entries".
    """
    cd_offset, _, _ = _central_directory(raw)
    pos = cd_offset
    for _ in range(record):
        n, m, k = struct.unpack("<3H", raw[pos + 28: pos + 34])
        pos += 46 + n + m + k
    assert raw[pos: pos + 4] == b"PK\x01\x02"
    bad = bytearray(raw)
    bad[pos + 33] ^= 0x40  # comment length += 16384
    return bytes(bad)


@pytest.mark.parametrize("writer", ["save", "previous-version"])
def test_entries_dropped_by_a_damaged_directory_record_raise(tmp_path, writer):
    path = tmp_path / "c.npz"
    if writer == "save":
        sbn.save(_state(), path)
    else:
        _write_previous_version(path, _state())
    path.write_bytes(_drop_entries_by_comment_length(path.read_bytes(), record=1))
    with zipfile.ZipFile(path) as z:  # what happened before: 2 entries, no error
        assert len(z.infolist()) == 2
    with pytest.raises(CheckpointError,
                       match="c.npz: the zip end record declares 4 entries but the"
                             " central directory yields 2"):
        sbn.load(path)


def test_zip64_end_record_counts_are_used(tmp_path, monkeypatch):
    # a checkpoint of more than 65535 entries or 4 GiB carries a zip64 end
    # record; make zipfile write one for a small archive
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    path = tmp_path / "z64.npz"
    sbn.save(_state(), path)
    raw = path.read_bytes()
    rec64 = raw.rfind(b"PK\x06\x06")
    assert rec64 > 0
    assert _same(sbn.load(path), _state())
    # the total of the zip64 record is what counts
    assert struct.unpack("<Q", raw[rec64 + 32: rec64 + 40]) == (4,)
    bad = bytearray(raw)
    bad[rec64 + 32] ^= 0x02
    path.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="declares 6 entries but the central directory"
                                              " yields 4"):
        sbn.load(path)
    path.write_bytes(_drop_entries_by_comment_length(raw, record=2))
    with pytest.raises(CheckpointError, match="declares 4 entries.*yields 3"):
        sbn.load(path)


def _rewrite(src, dst, replace=None, comments=None, archive_comment=None):
    """Copy a zip member by member (fresh, valid CRCs), changing some members or comments.

    ``replace`` maps member names to new data (``None`` drops the member),
    ``comments`` member names to new comments.
    """
    replace, comments = replace or {}, comments or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
                zout.getinfo(info.filename).comment = comments.get(info.filename,
                                                                   info.comment)
        zout.comment = zin.comment if archive_comment is None else archive_comment


def _npy(arr):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr)
    return buf.getvalue()


def test_manifest_catches_what_the_zip_crc_cannot(tmp_path):
    src = tmp_path / "s.npz"
    sbn.save(_state(), src)
    dst = tmp_path / "d.npz"
    with zipfile.ZipFile(src) as z:
        head = json.loads(z.comment)
        bias = json.loads(z.getinfo("bias.npy").comment)
        size = z.getinfo("bias.npy").file_size
    assert head == {"format": "cupysyncbn-checkpoint", "version": 1, "entries": 4}
    assert bias["dtype"] == "<f4" and bias["shape"] == [3] and bias["size"] == size
    assert len(bias["sha256"]) == 64
    # an untouched copy loads: the checks below fail for the damage, not the copy
    _rewrite(src, dst)
    assert _same(sbn.load(dst), _state())

    def comment(**changes):
        return json.dumps({**head, **changes}).encode()

    cases = {
        # same dtype and shape, other values, valid CRC: only the SHA-256 differs
        "values": ({"replace": {"bias.npy": _npy(np.ones(3, np.float32))}},
                   "entry 'bias' does not match the checkpoint's manifest"),
        "shape": ({"replace": {"bias.npy": _npy(np.zeros(4, np.float32))}},
                  "entry 'bias' does not match"),
        "dtype": ({"replace": {"bias.npy": _npy(np.zeros(3, np.float64))}},
                  "entry 'bias' does not match"),
        "dropped": ({"replace": {"bias.npy": None}}, "manifest lists 4 entries, the archive"
                                                     " holds 3"),
        "version": ({"archive_comment": comment(version=2)},
                    "manifest version 2; .*newer cupysyncbn"),
        "foreign-comment": ({"archive_comment": b"made by zip 3.0"},
                            r"corrupt checkpoint manifest \(the archive comment"),
        "entry-comment": ({"comments": {"bias.npy": b'{"dtype":"<f4"}'}},
                          r"corrupt checkpoint manifest \(entry 'bias'\)"),
        "entry-sha": ({"comments": {"bias.npy": json.dumps({**bias, "sha256": "0" * 64})
                                    .encode()}}, "entry 'bias' does not match"),
    }
    for change, pattern in cases.values():
        _rewrite(src, dst, **change)
        with pytest.raises(CheckpointError, match=pattern):
            sbn.load(dst)
    # one entry more than the manifest lists
    _rewrite(src, dst)
    with zipfile.ZipFile(dst, "a") as z:
        z.writestr("extra.npy", _npy(np.ones(1)))
    with pytest.raises(CheckpointError, match="lists 4 entries, the archive holds 5"):
        sbn.load(dst)


def test_files_without_manifest_still_load(tmp_path):
    _write_previous_version(tmp_path / "old.npz", _state())
    assert _same(sbn.load(tmp_path / "old.npz"), _state())
    np.savez(tmp_path / "np.npz", **_state())
    assert _same(sbn.load(tmp_path / "np.npz"), _state())


def test_numpy_reads_exactly_the_state_dict(tmp_path):
    # the manifest is in comments: np.load lists the keys only, so
    # dict(np.load(path)) is the state dict
    sd = _state()
    sbn.save(sd, tmp_path / "s.npz")
    assert _same(sbn.load(tmp_path / "s.npz"), sd)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert z.files == list(sd)
        assert _same(dict(z), sd)


def test_duplicate_member_is_refused(tmp_path):
    path = tmp_path / "dup.npz"
    _write_previous_version(path, {"w": np.ones(2)})
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("w.npy", _npy(np.zeros(2)))
    with pytest.raises(CheckpointError, match="appears twice"):
        sbn.load(path)


def test_end_record_reader_matches_zipfile(tmp_path):
    # the count check reads the end record zipfile reads: at the very end of
    # the file, or followed by the archive comment (which holds the manifest)
    path = tmp_path / "c.npz"
    _write_previous_version(path, _state())
    with open(path, "rb") as fh:
        assert path.read_bytes()[-22:-18] == b"PK\x05\x06"
        assert sio._end_record_counts(fh) == (4, 4)
    sbn.save(_state(), path)
    with open(path, "rb") as fh:
        assert path.read_bytes()[-22:-18] != b"PK\x05\x06"
        assert sio._end_record_counts(fh) == (4, 4)
    assert _same(sbn.load(path), _state())
    # a comment holding the end record's signature: zipfile finds no archive, nor do we
    with zipfile.ZipFile(path, "a") as z:
        z.comment = b"PK\x05\x06 inside a comment"
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)
    with pytest.raises(CheckpointError, match="c.npz: truncated zip end record"):
        sbn.load(path)
