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


# Variables a launcher sets to describe a rank. Tests start without them, so that every
# launch simulated by a test (srun, mpirun, torchrun, deepspeed) sees only what it sets itself.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "CROSS_RANK", "CROSS_SIZE", "TORCHELASTIC_RUN_ID")
_LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "SLURM_")


@pytest.fixture(autouse=True)
def _isolate_launcher_environment():
    """In-process trainers (some in module-scoped fixtures) export RANK/WORLD_SIZE/MASTER_* for
    DeepSpeed. Strip launcher variables before each test and restore the environment after, so
    that no test inherits another's rank layout. A process group that is already up does not need
    them (engine.init_distributed re-exports what DeepSpeed reads)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in _LAUNCHER_VARS or key.startswith(_LAUNCHER_PREFIXES):
            del os.environ[key]
    yield
    os.environ.clear()
    os.environ.update(saved)
