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
def _isolate_launcher_environment():
    """In-process trainers (some in module-scoped fixtures) export RANK/WORLD_SIZE/MASTER_* for
    DeepSpeed. Strip launcher variables before each test and restore the environment after, so
    that no test inherits another's rank layout. A process group that is already up does not need
    them (engine.init_distributed re-exports what DeepSpeed reads)."""
    # Tests start without launcher variables, so that every launch a test simulates (srun, mpirun,
    # torchrun, deepspeed) sees only what it sets itself.
    from megadalle.distributed.launch import without_launcher_vars

    saved = dict(os.environ)
    kept = without_launcher_vars(saved)
    os.environ.clear()
    os.environ.update(kept)
    yield
    os.environ.clear()
    os.environ.update(saved)
