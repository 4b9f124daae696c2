"""``scripts/gpu_check.sh`` on a machine without a GPU: a clear, fast failure.

It must stop within a minute, exit non-zero, say that there is no GPU, and
still leave its one report file (markdown ending with a JSON block). On a
machine with a GPU the script runs everything (minutes), so this test is
skipped there: ``gpu_check.sh`` itself is the check then.
"""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from support import ROOT


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: run scripts/gpu_check.sh itself")
def test_gpu_check_without_gpu_fails_fast_and_says_why(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), WHEELS=str(tmp_path / "none"))
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert took < 60
    assert "there is no GPU on this machine" in p.stderr
    report = (tmp_path / "gpu_check.md").read_text()
    assert "FAILED: cupysyncbn GPU check: there is no GPU" in report
    block = re.search(r"```json\n(.*?)\n```", report, re.S).group(1)
    data = json.loads(block)
    assert data["status"] == "no-gpu" and data["detail"].startswith("NO GPU:")
