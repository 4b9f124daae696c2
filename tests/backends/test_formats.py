"""Data formats: Paddle's rule, every name x every input rank 2-5.

Channel-first names (NC, NCL, NCW, NCHW, NCDHW) put the channels on axis 1 and
channel-last names (NLC, NWC, NHWC, NDHWC) on the last axis, whatever the rank
of the input (2 to 5). Reference: float64 NumPy on the batch (``bn_ref``),
whose channel axis is written out independently of ``cupysyncbn.arrays.formats``.
"""

import numpy as np
import pytest
from support import bn_ref

import cupysyncbn as sbn
from cupysyncbn import functional as F
from cupysyncbn.arrays.formats import FORMATS, format_for_ndim, parse_data_format
from cupysyncbn.comm.base import NoCommunicator

LOCAL = NoCommunicator()
FIRST = ["NC", "NCL", "NCW", "NCHW", "NCDHW"]
LAST = ["NLC", "NWC", "NHWC", "NDHWC"]
NAMES = FIRST + LAST
C = 3
# Every non-channel size differs from C, so normalizing a wrong axis either
# fails on the channel count or gives values the reference rejects.
OTHER = {2: (5,), 3: (4, 5), 4: (2, 4, 5), 5: (2, 2, 4, 5)}


def _shape(name, ndim):
    rest = OTHER[ndim]
    if name in FIRST:
        return (rest[0], C, *rest[1:])
    return (*rest, C)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_every_name_every_rank_matches_float64_reference(rng, name, ndim):
    shape = _shape(name, ndim)
    x = rng.standard_normal(shape) * 2 + 0.5
    dy = rng.standard_normal(shape)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    layer = sbn.SyncBatchNorm(C, data_format=name, dtype="float64", momentum=0.7, comm=LOCAL)
    layer.weight.data[...] = w
    layer.bias.data[...] = b
    rm, rv = bn_ref.check_training_step(layer, x, dy, name, w, b, 0.7)
    layer.eval()
    np.testing.assert_allclose(layer(x), bn_ref.ref_eval(x, name, rm, rv, w, b), atol=1e-12)
    # the functional API follows the same rule
    res = F.batch_norm_forward(x, w, b, data_format=name, comm=LOCAL)
    np.testing.assert_allclose(res.y, bn_ref.ref_forward(x, name, w, b)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["NC", "NCL", "NCHW"])
def test_channel_first_name_on_a_cube_normalizes_axis_1(rng, name):
    # The trap: NC with a 3-D input whose L equals C used to normalize
    # the last axis silently. Every axis has size C here.
    x = rng.standard_normal((C, C, C)) + np.arange(C).reshape(1, C, 1) * 5
    y = sbn.SyncBatchNorm(C, data_format=name, dtype="float64", comm=LOCAL)(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(y, bn_ref.ref_forward(x, "NCL")[0], atol=1e-12)
    assert np.abs(y.mean(axis=(0, 1))).max() > 1e-3  # not the last axis


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(C,), (2, C, 1, 1, 1, 1)])
def test_other_ranks_raise_naming_shape_and_format(name, shape):
    layer = sbn.SyncBatchNorm(C, data_format=name, comm=LOCAL)
    before = layer._mean.copy()
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32))
    msg = str(info.value)
    assert str(shape) in msg and parse_data_format(name).name in msg and "2 to 5" in msg
    assert np.array_equal(layer._mean, before) and layer.num_pending == 0
    with pytest.raises(ValueError, match="2 to 5 dimensions"):
        F.batch_norm_forward(np.ones(shape, np.float32), data_format=name, comm=LOCAL)


@pytest.mark.parametrize("cls,fmts,ok,bad", [
    (sbn.BatchNorm1D, ["NC", "NCL", "NLC", "NCW", "NWC"], (2, 3), (1, 4, 5)),
    (sbn.BatchNorm2D, ["NCHW", "NHWC"], (4,), (2, 3, 5)),
    (sbn.BatchNorm3D, ["NCDHW", "NDHWC"], (5,), (2, 3, 4)),
])
def test_local_layers_keep_paddles_rank_checks(rng, cls, fmts, ok, bad):
    for name in fmts:
        layer = cls(C, data_format=name, dtype="float64")
        for nd in ok:
            x = rng.standard_normal(_shape(name, nd))
            np.testing.assert_allclose(layer(x), bn_ref.ref_forward(x, name)[0], atol=1e-12)
        for nd in bad:
            shape = _shape(name, nd) if nd in OTHER else (C,)
            with pytest.raises(ValueError, match=rf"{cls.__name__} takes .*got shape"):
                layer(np.ones(shape))
    with pytest.raises(ValueError, match="data_format"):
        cls(C, data_format="NHWC" if cls is not sbn.BatchNorm2D else "NCL")


def test_format_for_ndim_table():
    first = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
    last = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}
    for name in NAMES:
        fmt = parse_data_format(name)
        table = first if name in FIRST else last
        for nd in range(7):
            got = format_for_ndim(fmt, nd)
            assert (got.name if got else None) == table.get(nd), (name, nd)
            if got is not None:
                assert got.ndim == nd and got.channel_axis == (1 if name in FIRST else nd - 1)
    assert parse_data_format("nwc") is FORMATS["NLC"] and parse_data_format("NCW") is FORMATS["NCL"]
    with pytest.raises(ValueError, match="data_format"):
        parse_data_format("NCWH")
    with pytest.raises(TypeError, match="data_format"):
        parse_data_format(4)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("name", NAMES)
def test_backends_only_see_canonical_views(monkeypatch, rng, name, ndim):
    # The CPU and CUDA backends take (N, C, S) channel-first or (M, C)
    # channel-last views: the format rule lives in formats.py only.
    from cupysyncbn.backends import get_backend

    cls = type(get_backend(np.zeros(1)))
    seen = []
    orig = cls.moments

    def spy(self, v, channel_last, cdt):
        seen.append((v.ndim, channel_last, v.shape[-1 if channel_last else 1]))
        return orig(self, v, channel_last, cdt)

    monkeypatch.setattr(cls, "moments", spy)
    x = rng.standard_normal(_shape(name, ndim))
    sbn.SyncBatchNorm(C, data_format=name, dtype="float64", comm=LOCAL)(x)
    (vdim, cl, c), = seen
    assert c == C and vdim == (2 if cl else 3)
    assert cl == (ndim == 2 or name in LAST)
