"""``scripts/mutation_check.py`` cannot go stale silently.

The script applies known bugs (issue 27) to a copy of the package by exact
text replacement and runs the tests chosen for each. Here, fast: every
pattern still occurs exactly once in the current source, each mutation
changes it, and the tests it names exist. The full mutation run is not part
of the suite (see docs/testing.md).
"""

import importlib.util
import sys

import pytest
from support import ROOT

ISSUE_27_BUGS = {
    "mean_term_zeroed", "unbiased_local_count", "float64_in_float32", "fsync_removed",
    "numpy_merge_broken", "staged_copy_back_dropped", "no_sync_cuda_aware",
    "nccl_null_stream", "torch_stream_ignored", "int32_index",
}


def _script():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


MC = _script()


def test_every_bug_of_the_issue_has_a_mutation():
    names = [m.name for m in MC.MUTATIONS]
    assert len(names) == len(set(names))
    assert ISSUE_27_BUGS <= set(names)


@pytest.mark.parametrize("m", MC.MUTATIONS, ids=lambda m: m.name)
def test_pattern_matches_the_current_source(m):
    assert MC.stale(m) is None, (
        f"mutation {m.name} is stale: {MC.stale(m)}; update scripts/mutation_check.py to"
        " the new source (and rerun it)")
    assert m.old != m.new
    for t in m.tests:
        if t.startswith("tests/"):
            assert (ROOT / t.split("::")[0]).is_file(), t


def test_stale_pattern_is_reported(tmp_path):
    m = MC.MUTATIONS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("nothing of the pattern here\n")
    assert "occurs 0 times" in MC.stale(m, tmp_path)
    other = next(o for o in MC.MUTATIONS if o.path != m.path)
    assert "does not exist" in MC.stale(other, tmp_path)
