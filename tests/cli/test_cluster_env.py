"""cluster=multinode takes nodes and processes per node from what torchrun or srun exported (torchrun first),
one node of 8 when started by hand; the launcher's counts are checked against each other."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from omnibal_pl.errors import ConfigError
from omnibal_pl.launch_env import launch_shape, register_resolvers

from tests.helpers import cfg_of

TORCHRUN_2x8 = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "ROLE_WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1"}
SRUN_4x8 = {"SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "32", "SLURM_PROCID": "9"}
LAUNCH_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "GROUP_RANK", "ROLE_WORLD_SIZE", "RANK",
                    "LOCAL_RANK", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_NTASKS", "SLURM_PROCID")


def bare_environ() -> dict[str, str]:
    """This process's environment without any launcher's variables (the tests may run under one)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}


@pytest.mark.parametrize("env, shape", [
    (TORCHRUN_2x8, (2, 8)),
    ({"WORLD_SIZE": "24", "LOCAL_WORLD_SIZE": "8"}, (3, 8)),      # nodes derived from the world size
    ({"WORLD_SIZE": "24", "GROUP_WORLD_SIZE": "4"}, (4, 6)),      # processes per node derived
    ({"LOCAL_WORLD_SIZE": "4"}, (1, 4)),
], ids=["full", "no-group", "no-local", "local-only"])
def test_torchrun(env, shape):
    assert launch_shape(env) == shape


@pytest.mark.parametrize("env, shape", [
    (SRUN_4x8, (4, 8)),
    ({"SLURM_NNODES": "2", "SLURM_NTASKS": "6"}, (2, 3)),         # --ntasks without --ntasks-per-node
    ({"SLURM_NNODES": "3"}, (3, 8)),                              # sbatch --nodes=3, no task count
], ids=["full", "no-per-node", "nodes-only"])
def test_srun(env, shape):
    assert launch_shape(env) == shape


def test_torchrun_wins_over_slurm():
    # srun torchrun ...: SLURM starts one agent a node, torchrun 4 workers a node
    env = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "2",
           "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"}
    assert launch_shape(env) == (2, 4)


@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "8", "LOCAL_RANK": "3", "NODE_RANK": "0"}],
                         ids=["bare", "lightning-child"])
def test_by_hand_is_one_node_of_the_default(env):
    # Lightning's own launcher exports WORLD_SIZE (alone) to the processes it starts: not torchrun
    assert launch_shape(env) == (1, 8)
    assert launch_shape(env, default_devices=2) == (1, 2)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "8"}, "WORLD_SIZE=12 is not a multiple of LOCAL_WORLD_SIZE=8"),
    ({"WORLD_SIZE": "12", "GROUP_WORLD_SIZE": "5"}, "WORLD_SIZE=12 is not a multiple of GROUP_WORLD_SIZE=5"),
    ({**TORCHRUN_2x8, "GROUP_WORLD_SIZE": "4"}, "WORLD_SIZE=16 is not LOCAL_WORLD_SIZE=8 x GROUP_WORLD_SIZE=4"),
    ({**SRUN_4x8, "SLURM_NTASKS": "30"}, "SLURM_NTASKS=30 is not SLURM_NTASKS_PER_NODE=8 x SLURM_NNODES=4"),
    ({"LOCAL_WORLD_SIZE": "eight"}, "LOCAL_WORLD_SIZE='eight' is not a positive whole number"),
    ({"SLURM_NNODES": "0"}, "SLURM_NNODES='0' is not a positive whole number"),
], ids=["world-local", "world-group", "torchrun-product", "slurm-product", "not-a-number", "zero"])
def test_inconsistent_variables_are_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        launch_shape(env)


def test_the_resolvers_register_once_and_read_the_environment_when_resolved(monkeypatch):
    register_resolvers()
    register_resolvers()  # idempotent
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cluster = cfg_of("cluster=multinode").cluster
    assert (cluster.num_nodes, cluster.devices) == (1, 8)
    for name, value in TORCHRUN_2x8.items():
        monkeypatch.setenv(name, value)
    assert (cluster.num_nodes, cluster.devices) == (2, 8)


@pytest.mark.parametrize("launcher, num_nodes", [(TORCHRUN_2x8, 2), (SRUN_4x8, 4), ({}, 1)],
                         ids=["torchrun", "srun", "by-hand"])
def test_omnibal_train_resolves_the_launch_shape(tmp_path, launcher, num_nodes):
    result = subprocess.run([sys.executable, "-m", "omnibal_pl.cli.train", "cluster=multinode", "--cfg", "job",
                             "--resolve"], cwd=tmp_path, env={**bare_environ(), **launcher}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cluster = yaml.safe_load(result.stdout)["cluster"]
    assert (cluster["num_nodes"], cluster["devices"]) == (num_nodes, 8)
