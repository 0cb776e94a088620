"""Typed configuration: Hydra/OmegaConf nodes checked against the package's dataclass schemas, and the
schemas every command shares (cluster, plan settings)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from omnibal_pl.errors import ConfigError

T = TypeVar("T")


def to_dataclass(node: DictConfig | dict[str, Any], schema: type[T], where: str) -> T:
    """``node`` as an instance of the dataclass ``schema``.

    An unknown key, a missing required key or a value of the wrong type raises :class:`ConfigError`
    naming ``where.key``, so a typo on the command line fails at start, not mid-run.
    """
    try:
        if isinstance(node, DictConfig):  # resolve interpolations while the node still has its parent
            node = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{key if key.startswith(where + '.') else f'{where}.{key}'}: {reason}; valid keys and types are those of {schema.__name__}") from None


def check_keys(cfg: DictConfig, allowed: Iterable[str], app: str) -> None:
    """Raises :class:`ConfigError` naming every top-level key of ``cfg`` that ``app`` does not know (a
    ``+foo=1`` on the command line is a typo, not a silent no-op)."""
    unknown = sorted(set(cfg.keys()) - set(allowed) - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level keys {unknown}; {app} knows {sorted(set(allowed))}")


@dataclass
class ClusterConfig:
    """Where a run executes (the ``cluster`` group, shared by ``omnibal-train`` and ``omnibal-plan``).

    Lightning's accelerator/devices/nodes/strategy/precision; ``threads``: torch CPU threads; ``peak_tflops``:
    the device's dense bf16 peak per GPU for MFU; ``pp``: pipeline stages (``strategy: omnibal``);
    ``dp``: data-parallel ranks (``omnibal-train``: None = devices x num_nodes / pp, a set value must agree;
    ``omnibal-plan``: the DP size to plan for); ``schedule``: ``1f1b`` | ``gpipe`` | ``interleaved``;
    ``device``: the cost-model preset (``h100_80gb``, ``h200``, ``a100_80gb``; None: this machine);
    ``zero``: ZeRO level over the DP ranks (0 replicated, 2 gradients and optimizer state sharded, 3
    parameters too; :mod:`omnibal_pl.parallel.sharding`), run by ``strategy: omnibal`` (``pp: 1`` for plain DP).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    threads: Optional[int] = None
    peak_tflops: Optional[float] = None
    pp: int = 1
    dp: Optional[int] = None
    schedule: str = "1f1b"
    device: Optional[str] = None
    zero: int = 0

    @property
    def world_size(self) -> int:
        return int(self.devices) * int(self.num_nodes)

    def data_parallel_size(self) -> int:
        """The run's DP size: the processes divided by the pipeline stages (and ``dp``, when set, must agree)."""
        world, pp = self.world_size, int(self.pp)
        if pp > 1 and self.strategy != "omnibal":
            raise ConfigError(f"cluster.pp={pp}: pipeline parallelism runs under cluster.strategy=omnibal")
        if pp < 1 or world % pp:
            raise ConfigError(f"cluster.pp={pp} does not divide the {world} processes (cluster.devices x num_nodes): "
                              f"pp x dp must equal the world size; pick pp among the divisors of {world}")
        if pp > 1 and self.strategy != "omnibal":
            raise ConfigError(f"cluster.pp={pp}: pipeline parallelism runs under cluster.strategy=omnibal")
        if self.zero and self.strategy != "omnibal":
            raise ConfigError(f"cluster.zero={self.zero}: sharding runs under cluster.strategy=omnibal (with cluster.pp=1 "
                              "for plain data parallelism)")
        dp = world // pp
        if self.zero and dp == 1:
            warnings.warn(f"cluster.zero={self.zero} with one data-parallel rank shards nothing", stacklevel=2)
        if self.dp is not None and int(self.dp) != dp:
            raise ConfigError(f"cluster.dp={self.dp} but {world} processes / cluster.pp={pp} give dp={dp}; "
                              "leave cluster.dp null or launch pp x dp processes")
        return dp


@dataclass
class PlanSettings:
    """How a pipeline plan is made (the ``plan`` group of both CLIs).

    ``source``: block costs from ``profile`` (measured here), ``cost_model`` (config FLOPs x the
    ``cluster.device`` preset) or ``auto`` (profile models under 1B parameters); ``virtual_stages``: stages
    per rank under the interleaved schedule; ``memory_fraction``: the share of device memory a stage may
    plan for (the training state is split over DP as ``cluster.zero`` splits it);
    ``memory_gb``: the memory budget per rank in GiB instead (None: ``memory_fraction`` of the device's);
    ``profile_cache``: folder of measured profiles (None: the run directory's); ``threads``: CPU threads
    while profiling (None: torch's default).
    """

    source: str = "auto"
    virtual_stages: int = 2
    memory_fraction: float = 0.9
    memory_gb: Optional[float] = None
    profile_cache: Optional[str] = None
    threads: Optional[int] = None
