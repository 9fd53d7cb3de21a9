"""Two-level groups: how L (ranks per machine) is resolved, and the bad cases.

The group membership itself is checked with 4 real gloo processes in test_powersgd.py
(test_groups_are_machines_and_local_indices), which shares that launch to save start-up time.
"""

import subprocess
import sys

import pytest

from megadalle.config import ConfigError, load_config
from megadalle.distributed.groups import build_groups, resolve_gpus_per_node
from megadalle.distributed.launch import DistEnv


def test_configured_gpus_per_node_simulates_machines():
    env = DistEnv(rank=3, world_size=4, local_rank=3, local_world_size=4, launcher="deepspeed")
    assert resolve_gpus_per_node(4, gpus_per_node=2, env=env) == 2  # 2 machines x 2 on one host
    assert resolve_gpus_per_node(4, gpus_per_node=1, env=env) == 1


def test_launcher_local_world_size_is_the_default():
    env = DistEnv(rank=9, world_size=16, local_rank=1, local_world_size=8, launcher="srun")
    assert resolve_gpus_per_node(16, env=env) == 8
    assert resolve_gpus_per_node(1, env=DistEnv()) == 1


@pytest.mark.parametrize("world, per_node, fragment", [
    (4, 3, "does not divide the world size 4"),
    (6, 4, "does not divide the world size 6"),
])
def test_gpus_per_node_must_divide_the_world(world, per_node, fragment):
    env = DistEnv(rank=0, world_size=world, local_rank=0, local_world_size=world, launcher="deepspeed")
    with pytest.raises(ConfigError, match=fragment):
        resolve_gpus_per_node(world, gpus_per_node=per_node, env=env)


def test_uneven_launcher_layout_is_refused():
    env = DistEnv(rank=0, world_size=6, local_rank=0, local_world_size=4, launcher="srun")
    with pytest.raises(ConfigError, match="launcher's local world size=4"):
        resolve_gpus_per_node(6, env=env)


def test_cyclic_rank_numbering_is_refused():
    # mpirun --map-by node: rank 1 is the first rank of the second machine.
    env = DistEnv(rank=1, world_size=4, local_rank=0, local_world_size=2, launcher="mpirun")
    with pytest.raises(ConfigError, match="machine by machine"):
        resolve_gpus_per_node(4, env=env)
    # Setting gpus_per_node explicitly is the user's statement of the layout and is accepted.
    assert resolve_gpus_per_node(4, gpus_per_node=2, env=env) == 2


def test_build_groups_needs_an_initialised_process_group():
    # In a fresh interpreter: other tests in this process may have left a 1-rank group up.
    code = ("import pytest\nfrom megadalle.distributed.groups import build_groups\n"
            "with pytest.raises(RuntimeError, match='initialised'):\n    build_groups(2)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_config_field_is_validated():
    assert load_config("tiny", overrides=["--distributed.gpus_per_node=2"]).distributed.gpus_per_node == 2
    with pytest.raises(ConfigError, match="gpus_per_node must be >= 0"):
        load_config("tiny", overrides=["--distributed.gpus_per_node=-2"])
    with pytest.raises(ConfigError, match="orth_eps"):
        load_config("tiny", overrides=["--distributed.powersgd.orth_eps=0"])
    cfg = load_config("tiny", overrides=["--distributed.powersgd.uncompressed=[head*]"])
    assert cfg.distributed.powersgd.uncompressed == ["head*"]
