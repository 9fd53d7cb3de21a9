"""Test set-up shared by every test module.

The repository root goes first on sys.path and into PYTHONPATH, so that tests (and the
processes they launch: deepspeed, torchrun, mpirun, `python -m megadalle`) import the code of
this checkout, not whichever checkout the virtualenv was installed from.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
# Launched ranks must not each grab every core of a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process trainers export RANK/WORLD_SIZE/MASTER_* for DeepSpeed; undo that after each
    test so that processes launched by later tests (srun/mpirun/torchrun simulations) do not
    inherit a stale 1-rank layout."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
