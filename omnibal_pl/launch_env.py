"""Nodes and processes per node from what the launcher exported: torchrun first, then srun, else by hand.

:func:`launch_rank` reads this process's global rank the same way, before any process group exists.

Each launcher exports three counts (torchrun's in ``torch.distributed.elastic``'s local agent, srun's in
its manual):

- torchrun: ``WORLD_SIZE`` (all workers), ``LOCAL_WORLD_SIZE`` (workers on this node) and
  ``GROUP_WORLD_SIZE`` (agents, one a node: the number of nodes);
- srun: ``SLURM_NTASKS``, ``SLURM_NTASKS_PER_NODE`` (only with ``--ntasks-per-node``) and ``SLURM_NNODES``.

torchrun wins over SLURM: under ``srun torchrun ...`` SLURM counts the agents (one task a node), torchrun
the workers. A launcher is present when its per-node or node count is set; ``WORLD_SIZE`` alone is no
sign of torchrun, since Lightning exports it to the processes it starts itself. A count the launcher
left out is derived from the other two, else defaults: one node, ``default_devices`` per node.

:func:`register_resolvers` exposes the two numbers to configs as ``${omnibal.num_nodes:}`` and
``${omnibal.devices_per_node:<default>}`` (``conf/cluster/multinode.yaml``); they read ``os.environ``
each time they are resolved.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import OmegaConf

from omnibal_pl.errors import ConfigError

DEFAULT_DEVICES_PER_NODE = 8


@dataclass(frozen=True)
class Launcher:
    """The variables in which one launcher exports its world size, processes per node and node count."""

    name: str
    world: str
    per_node: str
    nodes: str


TORCHRUN = Launcher("torchrun", world="WORLD_SIZE", per_node="LOCAL_WORLD_SIZE", nodes="GROUP_WORLD_SIZE")
SLURM = Launcher("srun", world="SLURM_NTASKS", per_node="SLURM_NTASKS_PER_NODE", nodes="SLURM_NNODES")
LAUNCHERS = (TORCHRUN, SLURM)  # in order of precedence


def _count(env: Mapping[str, str], name: str) -> int | None:
    """``env[name]`` as a positive integer; None when it is not set."""
    if name not in env:
        return None
    raw = env[name]
    if not raw.strip().isdecimal() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} is not a positive whole number: fix the launcher's environment")
    return int(raw)


def _quotient(launcher: Launcher, world: int, divisor: int, divisor_name: str) -> int:
    """``world // divisor``; :class:`ConfigError` naming the launcher's variables unless it divides exactly."""
    if world % divisor:
        raise ConfigError(f"{launcher.name}'s variables disagree: {launcher.world}={world} is not a multiple of "
                          f"{divisor_name}={divisor}; set cluster.num_nodes and cluster.devices explicitly")
    return world // divisor


def _shape_from(launcher: Launcher, env: Mapping[str, str], default_devices: int) -> tuple[int, int]:
    """(num_nodes, devices_per_node) from the variables of a launcher that set its per-node or node count;
    a count it left out is derived from the other two."""
    world, per_node, nodes = (_count(env, name) for name in (launcher.world, launcher.per_node, launcher.nodes))
    if world is not None:
        if nodes is None:
            nodes = _quotient(launcher, world, per_node, launcher.per_node)
        elif per_node is None:
            per_node = _quotient(launcher, world, nodes, launcher.nodes)
        elif world != nodes * per_node:
            raise ConfigError(f"{launcher.name}'s variables disagree: {launcher.world}={world} is not "
                              f"{launcher.per_node}={per_node} x {launcher.nodes}={nodes}; "
                              "set cluster.num_nodes and cluster.devices explicitly")
    return (1 if nodes is None else nodes), (default_devices if per_node is None else per_node)


def launch_shape(env: Mapping[str, str], default_devices: int = DEFAULT_DEVICES_PER_NODE) -> tuple[int, int]:
    """(num_nodes, devices_per_node) of this launch, from torchrun's variables, else srun's, else
    (1, ``default_devices``) for a run started by hand.

    Raises :class:`ConfigError` when a count is not a positive integer or the launcher's counts disagree
    (e.g. ``WORLD_SIZE`` not a multiple of ``LOCAL_WORLD_SIZE``).
    """
    for launcher in LAUNCHERS:
        if launcher.per_node in env or launcher.nodes in env:
            return _shape_from(launcher, env, default_devices)
    return 1, default_devices


def _num_nodes() -> int:
    """Resolver ``omnibal.num_nodes``: the number of nodes of this launch."""
    return launch_shape(os.environ)[0]


def _devices_per_node(default: int) -> int:
    """Resolver ``omnibal.devices_per_node:<default>``: processes per node, ``default`` when started by hand."""
    return launch_shape(os.environ, default)[1]


RESOLVERS = {"omnibal.num_nodes": _num_nodes, "omnibal.devices_per_node": _devices_per_node}


def register_resolvers() -> None:
    """Registers the ``omnibal.*`` resolvers with OmegaConf; calling it again changes nothing.

    The CLIs call it (``omnibal_pl.cli.conf``); code composing the config with Hydra's compose API calls it
    before resolving ``cluster=multinode``.
    """
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def launch_rank(devices_per_node: int) -> int:
    """This process's global rank as its launcher set it, before any process group exists: torchrun's
    ``RANK``, SLURM's ``SLURM_PROCID`` (srun), else Lightning's ``NODE_RANK`` x devices + ``LOCAL_RANK``
    (0 for a process launched alone)."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0)) * devices_per_node + int(os.environ.get("LOCAL_RANK", 0))
