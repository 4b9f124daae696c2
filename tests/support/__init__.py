"""Helpers shared by the test suite, imported as ``support.<name>``.

``tests/`` is on ``sys.path``: ``tests/conftest.py`` puts it there for pytest,
and :func:`support.mpi_runner.mpi_env` puts it on ``PYTHONPATH`` for the
processes the tests launch (``mpiexec``, ``torchrun``, ``python -c``).
"""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]  # tests/
ROOT = TESTS.parent  # the checkout
