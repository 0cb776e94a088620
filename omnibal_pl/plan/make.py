"""Making a plan: block costs (profiled or modelled) for one model, cluster and micro-batch shape, the
partition search, and the :class:`~omnibal_pl.plan.plan.Plan` of its result."""
from __future__ import annotations

from dataclasses import dataclass

from omnibal_pl.batch import MicroBatchShape
from omnibal_pl.errors import ConfigError
from omnibal_pl.model.config import TRANSFORMER_BLOCK_PREFIXES, VLMConfig
from omnibal_pl.plan.cost_model import PRESETS, block_parameters, cost_model_profile, device_preset, fit_device, hop_seconds
from omnibal_pl.plan.costs import CostProfile, ZeroSharding
from omnibal_pl.plan.partition import ScoredPartition, search_partition
from omnibal_pl.plan.plan import Plan
from omnibal_pl.plan.profiler import (HeadLoss, device_memory_bytes, local_device, next_token_loss, precision_of,
                                      profile_blocks)
from omnibal_pl.plan.schedule import PipelineConfig


@dataclass
class PlanInputs:
    """What a partition search needs for one model, cluster and micro-batch shape: the block costs, the
    pipeline config (schedule, memory budget per rank, hop seconds) and the shape."""

    profile: CostProfile
    config: PipelineConfig
    shape: MicroBatchShape
    device: str
    precision: str = "bf16-mixed"


def planning_inputs(model: VLMConfig, pp: int, micro_batches: int, vit_cap: int, token_cap: int, *, dp: int = 1,
                    schedule: str = "1f1b", device: str = "h100_80gb", source: str = "cost_model",
                    profile_cache: str | None = None, samples: int = 4, virtual_stages: int = 2,
                    memory_fraction: float = 0.9, zero: int = 0, precision: str = "bf16-mixed",
                    memory_gb: float | None = None, head_loss: HeadLoss = next_token_loss) -> PlanInputs:
    """Block costs and pipeline config for :func:`make_plan` (its docstring has the arguments); ``head_loss``:
    the loss a profile measures with ``llm.head`` (:func:`~omnibal_pl.plan.profiler.profile_blocks`)."""
    sharding = ZeroSharding(zero, dp)
    element_bytes = precision_of(precision).compute.itemsize
    if source not in ("profile", "cost_model"):
        raise ConfigError(f"plan source {source!r}: use 'profile' (measure the blocks here) or 'cost_model'")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    if memory_gb is not None and memory_gb <= 0:
        raise ConfigError(f"plan.memory_gb={memory_gb} must be > 0 (or null: memory_fraction of the device's memory)")
    shape = MicroBatchShape(vit_cap, token_cap, samples)
    if device not in (*PRESETS, "measured", "local"):
        device_preset(device)  # raises the error listing the presets
    measured = None
    if source == "profile" or device not in PRESETS:
        measured = profile_blocks(model, shape, precision=precision, sharding=sharding, cache_dir=profile_cache,
                                  head_loss=head_loss)
    if device in PRESETS:
        preset = device_preset(device)
        memory, hop = preset.memory_bytes, hop_seconds(model, shape, preset)
    else:  # this machine: its memory, and no link between stages to time
        preset, memory, hop = None, device_memory_bytes(local_device()), 0.0
    if source == "profile":
        profile = measured
    else:
        if preset is None:
            preset = fit_device(measured, model, memory)
        profile = cost_model_profile(model, shape, preset, element_bytes=element_bytes, sharding=sharding)
    profile.check_blocks(model.block_names())
    config = PipelineConfig(pp=pp, micro_batches=micro_batches, schedule=schedule,
                            virtual_stages=virtual_stages if schedule == "interleaved" else 1, hop_s=hop,
                            memory_budget_bytes=memory_gb * 2**30 if memory_gb is not None else memory * memory_fraction,
                            dp=dp, zero=zero)
    return PlanInputs(profile=profile, config=config, shape=shape, device=device, precision=precision_of(precision).name)


def plan_from_partition(model: VLMConfig, inputs: PlanInputs, scored: ScoredPartition, zero: int = 0) -> Plan:
    """The :class:`Plan` of a scored partition: stages by name, non-``none`` recompute modes, the simulated
    step and each stage's peak memory (static + in-flight micro-batches x kept activations), for a run at
    ZeRO level ``zero``."""
    names = inputs.profile.names
    bounds = scored.bounds
    sim = scored.sim
    memory = [s + n * a + t for s, n, a, t in
              zip(scored.static_bytes, sim.peak_in_flight, scored.activation_bytes, scored.transient_bytes)]
    return Plan(
        model=model.name,
        stages=tuple(tuple(names[i:j]) for i, j in zip(bounds, bounds[1:])),
        recompute={n: m for n, m in zip(names, scored.modes)
                   if m == "full" or (m == "attention" and n.startswith(TRANSFORMER_BLOCK_PREFIXES))},
        schedule=inputs.config.schedule, pp=inputs.config.pp, micro_batches=inputs.config.micro_batches,
        vit_cap=inputs.shape.vit_cap, token_cap=inputs.shape.token_cap,
        predicted_step_s=scored.step_s, stage_memory_bytes=tuple(memory), source=inputs.profile.source,
        dp=inputs.config.dp, zero=zero, precision=inputs.precision, device=inputs.device,
        memory_budget_bytes=inputs.config.budget(0),
        bubble_fraction=sim.bubble_fraction,
        notes={"samples_per_micro_batch": inputs.shape.samples, "policy": scored.policy,
               "hop_s": inputs.config.hop_s, "profile_device": inputs.profile.device,
               "stage_static_bytes": [float(b) for b in scored.static_bytes],
               "stage_transient_bytes": [float(b) for b in scored.transient_bytes],
               "stage_activation_bytes": [float(n * a) for n, a in zip(sim.peak_in_flight, scored.activation_bytes)]},
    )


def make_plan(model: VLMConfig, pp: int, micro_batches: int, vit_cap: int, token_cap: int, *, dp: int = 1,
              schedule: str = "1f1b", device: str = "h100_80gb", source: str = "cost_model",
              profile_cache: str | None = None, samples: int = 4, virtual_stages: int = 2,
              memory_fraction: float = 0.9, zero: int = 0, precision: str = "bf16-mixed",
              memory_gb: float | None = None) -> Plan:
    """The searched partition of ``model`` into pipeline stages with adaptive per-stage recompute.

    ``vit_cap`` tiles and ``token_cap`` tokens per micro-batch, packed as ``samples`` samples; ``pp``
    ranks, ``micro_batches`` per step, ``schedule`` (``interleaved`` runs ``virtual_stages`` chunks per
    rank). ``source``: ``cost_model`` (FLOPs timed by the ``device`` preset: ``h100_80gb``, ``h200``,
    ``a100_80gb``, or ``measured``/``local``: fitted to a profile of this machine) or ``profile``
    (measured here, cached in ``profile_cache``). The memory budget per rank is ``memory_fraction`` of
    the device's memory (the preset's, or this machine's for ``measured``/``local``), or ``memory_gb``
    GiB when given; parameters,
    gradients and optimizer state are split over the ``dp`` ranks as ZeRO level ``zero`` splits them
    (:class:`~omnibal_pl.plan.costs.ZeroSharding`), and the plan records the level. ``precision``: the run's
    Lightning precision (:data:`~omnibal_pl.plan.profiler.PRECISIONS`): a profile measures in it; the cost
    model counts 2 bytes per element for 16-bit precisions (``*-mixed`` included), 4 for ``32-true``. Raises
    :class:`PlanError` when no partition fits, naming the fix.
    """
    inputs = planning_inputs(model, pp, micro_batches, vit_cap, token_cap, dp=dp, schedule=schedule, device=device,
                             source=source, profile_cache=profile_cache, samples=samples,
                             virtual_stages=virtual_stages, memory_fraction=memory_fraction, zero=zero,
                             precision=precision, memory_gb=memory_gb)
    return plan_from_partition(model, inputs, search_partition(inputs.profile, inputs.config), zero)


def resolve_source(model: VLMConfig, source: str) -> str:
    """``plan.source``: ``profile`` | ``cost_model`` as given; ``auto``: profile models under 1B parameters
    (they fit and run here), the cost model otherwise."""
    if source not in ("auto", "profile", "cost_model"):
        raise ConfigError(f"plan.source={source!r}: choose auto, profile or cost_model")
    if source != "auto":
        return source
    return "profile" if sum(n for _, n in block_parameters(model)) < 1e9 else "cost_model"
