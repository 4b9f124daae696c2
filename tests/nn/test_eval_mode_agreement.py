"""Eval mode with batch statistics is part of what ranks agree on (issue #22 items 5-6).

With ``track_running_stats=False`` (Paddle: ``use_global_stats=False``) an
eval-mode forward still synchronizes batch statistics. A rank in eval mode
while its peers train must not pair with their training pass: every rank
raises ``CollectiveMismatchError`` in that pass. Inside ``local_eval()`` such
a layer uses this rank's own batch and communicates nothing.
"""

import re

import pytest
from support.mpi_runner import run_mpi

pytestmark = pytest.mark.mpi

CODE = r"""
import numpy as np
import cupysyncbn as sbn
from cupysyncbn.errors import CollectiveMismatchError

comm = sbn.init("mpi")
r = comm.rank
xg = np.random.default_rng(0).standard_normal((6, 3, 2, 2)) * 2 + 1
part = xg[:2] if r == 0 else xg[2:]


def norm(x):
    m = x.mean(axis=(0, 2, 3), keepdims=True)
    v = ((x - m) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5)


glob = norm(xg)[:2] if r == 0 else norm(xg)[2:]
out = []


def layers(kind):
    if kind == "native":
        return lambda: sbn.SyncBatchNorm(3, track_running_stats=False, dtype="float64")
    if kind == "paddle":
        import paddle
        from cupysyncbn.interop.paddle import SyncBatchNorm as PSBN
        paddle.set_default_dtype("float64")

        def make_paddle():
            bn = PSBN(3)
            bn._use_global_stats = False  # what converting use_global_stats=False sets
            return bn
        return make_paddle
    import torch
    from cupysyncbn.interop.torch import SyncBatchNorm
    torch.set_default_dtype(torch.float64)
    return lambda: SyncBatchNorm(3, track_running_stats=False)


def run(layer, x):
    if type(layer).__module__ == "cupysyncbn.interop.paddle":
        import paddle
        return layer(paddle.to_tensor(np.ascontiguousarray(x))).numpy()
    if type(layer).__module__.startswith("cupysyncbn.interop"):
        import torch
        with torch.no_grad():
            return layer(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return layer(x)


for kind in ("native", "torch", "paddle"):
    make = layers(kind)
    # 1. rank 0 in eval mode, rank 1 training: raised on every rank, in that pass
    bn = make()
    if r == 0:
        bn.eval()
    try:
        run(bn, part)
        out.append(f"{kind}: paired silently")
    except CollectiveMismatchError as e:
        out.append(f"{kind}: mismatch")
    # 2. every rank in eval mode: the global batch's statistics
    bn = make()
    bn.eval()
    assert np.abs(run(bn, part) - glob).max() < 1e-12, kind
    # 3. rank 0 evaluates alone inside local_eval(): its own batch, nothing sent;
    # then both train together as usual
    bn = make()
    if r == 0:
        bn.eval()
        with sbn.local_eval():
            assert np.abs(run(bn, part) - norm(part)).max() < 1e-12, kind
        bn.train()
    assert np.abs(run(bn, part) - glob).max() < 1e-12, kind
    out.append(f"{kind}: local ok")
import sys
sys.stdout.write(f"RESULT {r} {'; '.join(out)}\n")  # one write: ranks share stdout
sys.stdout.flush()
"""


def test_eval_and_train_never_pair_and_local_eval_is_local(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("paddle")
    res = run_mpi(CODE, 2, timeout=180, tmp_path=tmp_path,
                  env={"CUPYSYNCBN_TIMEOUT": "20"})
    lines = re.findall(r"RESULT \d [^\n]*", res.stdout)
    assert len(lines) == 2, res.stdout + res.stderr
    for ln in lines:
        for kind in ("native", "torch", "paddle"):
            assert f"{kind}: mismatch" in ln and f"{kind}: local ok" in ln, ln
