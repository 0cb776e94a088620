"""Training throughput at simulated DP: the slowest rank sets the step time, so balance is speed.

    .venv/bin/python scripts/bench_train.py [--models tiny internvl_100m] [--steps 6] [--repeats 3] [--dp 8]
        [--micro-batches 1]
        [--algorithms balanced balanced_fitted isf disttrain llamafactory swift random identical]
        [--save-time-model PATH] [--time-model PATH]
        [--calibration 48] [--calibration-reps N] [--calibration-designs d_optimal random] [--fit-only]
        [--save-timings PATH] [--allocator system|heap]

For each model and sampler, one process plays all DP ranks: each step, every rank's micro-batches (from its own
``OmniBalDataModule``, exactly as in training; ``--micro-batches`` per rank and step, as with gradient accumulation)
really run forward + backward in turn and are timed; a rank's time is the sum of its micro-batches', the step's
time the slowest rank's (what a synchronous data-parallel step waits for), the ideal the mean rank's over the same
micro-batches (perfect balance of the same work, the limit balance can reach). DistTrain's LPT deal has something
to balance only with more than one micro-batch per rank: at ``--micro-batches 1`` it gives each rank one of the
step's micro-batches, as random does.

Samplers: ``balanced`` (counts), ``balanced_fitted`` (``balance.cost=fitted``: steps formed on the fitted
time model), ``isf``, ``disttrain`` (LPT on the fitted model when one fits, else on tokens), the
``llamafactory`` and ``swift`` packers (the token cap ``balanced`` searched, tiles uncapped) and ``random``.
``identical`` is no sampler but the timing's floor: ``balanced``'s steps with rank 0's micro-batches run by every
rank, so the ranks' work is equal by construction and the idle it shows is what timing noise alone adds to the
slowest of ``--dp`` ranks.

Columns: ``idle`` = 1 - ideal / step (the share of the slowest rank's time the others wait); ``no idle`` = the
samples/s the same micro-batches would reach at zero idle (samples / ideal time), the most any balancing of the
same micro-batches can give; the lines under the table compare ``balanced`` with each sampler measured, and its
``no idle`` figure with theirs measured (the ceiling of balance alone, for targets above it).

Time model: before the samplers run, ``--calibration`` micro-batches of 1 to ``3 x samples-per-group`` samples
are timed and a :class:`~omnibal_pl.balance.TimeModel` is fitted on them, once per ``--calibration-designs``
entry (:mod:`omnibal_pl.balance.calibration`: ``d_optimal`` picks micro-batches that separate the model's terms,
``random`` draws them at random, the baseline; each timed by its fastest of ``--calibration-reps`` runs, default
``--reps``); the first design's model is the one ``balanced_fitted`` and
``disttrain`` weigh by and ``--save-time-model`` writes. Each model's prediction error is reported on every
micro-batch the samplers run (median and 90th percentile of |predicted - measured| / measured, and the ``bias``,
the median of the signed (predicted - measured) / measured): the table's columns for the first design, a line per
design under it. After the table the model is fitted again on every micro-batch the samplers ran (in-sample), with
each sampler's bias under that refit: a sampler the refit still over- or under-prices has micro-batches whose cost
the model's terms do not count; one priced right by the refit but not by the calibration's model was priced wrong
for a time model's ordinary reasons (a stale or noisy calibration). Beside the bias, the idle of each sampler's
steps as the refit prices them: a measured idle above it is timing noise or a cost no term counts, not a grouping
that a better fit of these terms would even out. ``--save-timings PATH`` writes every timed run
(sampler, repeat, step, rank, micro-batch, the model's features, the seconds of each run) as JSON;
``--refit-timings PATH`` prints that refit again from such a file, timing nothing. A fit that fails (too few micro-batches, times the
terms do not explain) is printed; when the first design's fails, ``balanced_fitted`` is skipped.
``--time-model PATH`` uses a model an earlier run saved instead (no calibration; its error is still reported), if it
was measured in this run's setting (model, device, precision, attention kernel, packing: its ``made_for``).
With a model, each sampler's modelled idle, samples/s and samples/s at no idle (the model's prediction of every
micro-batch, no timing) are printed before the timed runs, to hold the measured table against; ``--repeats 0`` stops there.

Repeats: the whole measurement of all samplers runs ``--repeats`` times. Within a repeat the samplers' steps are
interleaved (step 0 of every sampler, then step 1, ...; the sampler order rotates between repeats), so a slow
period of the shared machine falls on every sampler alike, not on one sampler's turn; printed per sampler: the median
over repeats and the spread (min..max) of samples/s, the median step time, ideal and idle fraction.
Speedups compare medians in samples/s (epoch time: samplers put different amounts of work in a step).
Which samples: with ``--steps N`` each sampler's first N steps, i.e. different samples per sampler, whose cost
differs as much as balance does over a few steps; with ``--steps 0`` and a small ``--samples`` every sampler runs
its whole epoch over the same samples (less the few a sampler's last incomplete step drops), so samples/s
compares the same work: the figure to quote.

Timing of one micro-batch: ``--reps`` runs, the fastest counts (on a shared machine, the least disturbed); in a
step the runs go round the ranks' micro-batches (rank 0's .. rank n-1's, ``--reps`` times), so a slow spell hits
every rank's runs. Under the table, each sampler's idle with the fastest of the first 1, 2, .. ``--reps`` runs:
where it still falls at ``--reps``, timing noise is still part of the idle (the floor's row shows how much).
Allocator (CPU): ``--allocator system`` (the default) leaves glibc's malloc as it is: an allocation above its mmap
threshold (at most 32 MiB) is mapped afresh and unmapped on free, so a micro-batch whose activations are that large
page-faults them in on every run, a cost that grows faster than the micro-batch (``bench_split.py`` measures it).
``heap`` serves every allocation from the heap and never returns freed memory, as PyTorch's caching allocator does
on a GPU (:func:`keep_freed_memory`).
Data: the synthetic dataset shaped by the embedded real-statistics generator, text scaled by
``--text-scale`` (CPU budget), image tokens = tiles x the model's tokens per tile. Every sampler packs with
``pad_to=multiple`` (varlen attention over the real tokens). On CUDA (``--device cuda``): bf16 autocast.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from omnibal_pl.balance import BalanceConfig, TimeModel, fit_time_model
from omnibal_pl.balance.cost import TERMS
from omnibal_pl.balance.calibration import DESIGNS, design_calibration
from omnibal_pl.batch import PackedBatch
from omnibal_pl.conf import preset
from omnibal_pl.data import ModelSpec, OmniBalDataModule, TrainingData, prepare_training_data
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.datamodule import PackingConfig
from omnibal_pl.errors import BalanceError, OmniBalError
from omnibal_pl.model import VLM, VLMConfig
from omnibal_pl.plan.profiler import default_precision
from omnibal_pl.train.objective import packed_loss_sum
from omnibal_pl.train.time_calibration import time_model_setting

ALGORITHMS = ("balanced", "balanced_fitted", "isf", "disttrain", "llamafactory", "swift", "random", "identical")
PACKING = PackingConfig(pad_to="multiple", multiple=64, loss_weighting="square")


ALLOCATORS = ("system", "heap")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Make glibc's malloc serve every allocation from its heap (no mmap) and never trim freed memory back to the OS
    (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` -1), so a freed activation's pages are reused, not faulted
    in again next run: what PyTorch's caching allocator does on a GPU. Call before the model allocates. Raises
    :class:`OmniBalError` where the C library has no ``mallopt`` (not glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt") or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):
        raise OmniBalError("--allocator heap needs glibc's mallopt, which this C library lacks; use --allocator system")


def load_model_config(name: str) -> VLMConfig:
    return VLMConfig.from_dict(preset("model", name))


def dataset_config(args: argparse.Namespace) -> dict:
    return {"name": "synthetic", "kind": "synthetic", "paths": [], "text_scale": args.text_scale, "seed": 0,
            "generator": {"samples": args.samples, "seed": 0, "max_tokens": None}}


def model_spec(cfg: VLMConfig) -> ModelSpec:
    return ModelSpec(cfg.llm.vocab_size, cfg.vision.image_size, cfg.tokens_per_tile, cfg.image_context_id)


def bench_setting(cfg: VLMConfig, device: torch.device) -> dict[str, str]:
    """The setting this benchmark times micro-batches in, as a time model records it."""
    return time_model_setting(cfg, device, default_precision(device), PACKING.pad_to)


def batch_features(batch: PackedBatch) -> list[float]:
    """The time model's features of a packed micro-batch: tiles run, tokens, squared sample lengths, samples."""
    lengths = batch.seqlens[: batch.num_samples]
    return [float(batch.pixel_values.shape[0]), float(sum(lengths)), float(sum(n * n for n in lengths)),
            float(batch.num_samples)]


def balance_config(algorithm: str, args: argparse.Namespace, model_path: Path | None) -> BalanceConfig:
    if algorithm == "balanced_fitted":
        return BalanceConfig(dp=args.dp, micro_batches=args.micro_batches, samples_per_group=args.samples_per_group,
                             cost="fitted", time_model=str(model_path))
    cost = "fitted" if algorithm == "disttrain" and model_path else "counts"
    return BalanceConfig(algorithm=algorithm, dp=args.dp, micro_batches=args.micro_batches,
                         samples_per_group=args.samples_per_group, cost=cost,
                         time_model=str(model_path) if model_path else None)


Step = list[list[PackedBatch]]  # [rank][micro-batch]: what each DP rank runs in one step


def rank_batches(cfg: VLMConfig, balance: BalanceConfig, args: argparse.Namespace) -> list[Step]:
    """``[step][rank][micro-batch]`` packed micro-batches of the first ``args.steps`` steps (0: the whole epoch),
    ``balance.micro_batches`` per rank and step in the order the rank runs them, one DataModule per DP rank."""
    data = prepare_training_data(dataset_config(args), balance, model_spec(cfg))  # caps resolved for args.dp ranks
    m = balance.micro_batches
    per_rank = []
    for rank in range(args.dp):
        dm = OmniBalDataModule(data, PACKING, dp_rank=rank)
        dm.setup("fit")
        batches = list(itertools.islice(dm.train_dataloader(), args.steps * m if args.steps else None))
        per_rank.append([batches[i:i + m] for i in range(0, len(batches), m)])  # whole steps: every rank yields them
    return [list(step) for step in zip(*per_rank)]


def sampler_steps(algorithm: str, cfg: VLMConfig, args: argparse.Namespace, model_path: Path | None) -> list[Step]:
    """``[step][rank][micro-batch]`` a sampler gives; for ``identical``, ``balanced``'s rank 0's on every rank."""
    if algorithm == "identical":
        steps = rank_batches(cfg, balance_config("balanced", args, model_path), args)
        return [[step[0]] * len(step) for step in steps]
    return rank_batches(cfg, balance_config(algorithm, args, model_path), args)


def bench_data(cfg: VLMConfig, args: argparse.Namespace) -> TrainingData:
    """The benchmark's synthetic samples, unbalanced (micro-batches are chosen by the caller)."""
    return prepare_training_data(dataset_config(args), BalanceConfig(algorithm="random", dp=args.dp), model_spec(cfg))


def collate_ids(data: TrainingData, ids: Sequence[int]) -> PackedBatch:
    """One packed micro-batch of the samples ``ids``, packed as every sampler's are (``PACKING``)."""
    samples = [data.dataset[int(i)] for i in ids]
    tokens, tiles = sum(s.num_tokens for s in samples), sum(s.num_tiles for s in samples)
    collate = PackingCollate(-(-tokens // PACKING.multiple) * PACKING.multiple, tiles, PACKING.pad_to,
                             PACKING.multiple, PACKING.loss_weighting)
    return collate(samples)


def calibration_batches(cfg: VLMConfig, args: argparse.Namespace, design: str, count: int) -> list[PackedBatch]:
    """``count`` micro-batches of 1 .. 3 x samples-per-group samples, chosen by ``design``."""
    data = bench_data(cfg, args)
    return [collate_ids(data, ids)
            for ids in design_calibration(data.lengths, count, 3 * args.samples_per_group, design, seed=1)]


def time_micro_batch(model: VLM, batch: PackedBatch, device: torch.device, reps: int) -> float:
    """Seconds of forward + loss + backward of one micro-batch: the fastest of ``reps`` runs."""
    batch = batch.to(device)
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss_sum, weight = packed_loss_sum(model(batch), batch)
        (loss_sum / weight.clamp(min=1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def time_ranks(model: VLM, step: list[PackedBatch], device: torch.device, reps: int) -> list[list[float]]:
    """Seconds of each of ``reps`` runs of each rank's micro-batch of ``step`` (``[rank][run]``), the runs going
    round the ranks (rank 0 .. n-1, then again), so that a slow spell of the machine, which lasts longer than a few
    runs, does not fall on one rank's runs alone."""
    on_device = [b.to(device) for b in step]  # once, not once per run
    runs: list[list[float]] = [[] for _ in step]
    for _ in range(reps):
        for rank, batch in enumerate(on_device):
            runs[rank].append(time_micro_batch(model, batch, device, 1))
    return runs


def time_step(model: VLM, step: Step, device: torch.device, reps: int) -> list[list[list[float]]]:
    """Seconds of each of ``reps`` runs of each rank's micro-batches of ``step`` (``[rank][micro-batch][run]``):
    the step's micro-batches timed by :func:`time_ranks`, the runs going round all of them."""
    runs = iter(time_ranks(model, [batch for work in step for batch in work], device, reps))
    return [[next(runs) for _ in work] for work in step]


def fastest(runs: list[list[list[float]]], k: int) -> list[float]:
    """Each rank's time (``runs``: ``[rank][micro-batch][run]`` seconds): the sum over its micro-batches of each
    one's fastest of its first ``k`` runs (on a shared machine, the least disturbed)."""
    return [sum(min(r[:k]) for r in work) for work in runs]


def idle_by_runs(steps: list[list[list[list[float]]]], reps: int) -> list[float]:
    """For k = 1 .. ``reps``: the idle of ``steps`` (``[step][rank][micro-batch][run]`` seconds), 1 - (sum over
    steps of the mean rank's time) / (sum of the slowest rank's), each micro-batch's time its fastest of its first k
    runs. Still falling at k = reps: timing noise is still part of the figure; flat: more runs would not change it."""
    idles = []
    for k in range(1, reps + 1):
        step_s, ideal_s = step_and_ideal([fastest(step, k) for step in steps])
        idles.append(1 - ideal_s / step_s)
    return idles


def priced(model: TimeModel, steps: list[list[list[list[float]]]]) -> list[list[float]]:
    """Each rank's seconds per step as ``model`` prices them (``steps``: ``[step][rank][micro-batch]`` features):
    the sum of its micro-batches' predictions, as a rank's measured time is the sum of theirs."""
    return [[float(model.predict(np.array(work)).sum()) for work in step] for step in steps]


def step_and_ideal(seconds: list[list[float]]) -> tuple[float, float]:
    """Summed over steps (``[step][rank]`` seconds): the slowest rank's time (what a synchronous step waits for)
    and the mean rank's (the ideal: the same work perfectly balanced)."""
    return sum(max(t) for t in seconds), sum(sum(t) / len(t) for t in seconds)


def fit_on_calibration(model: VLM, cfg: VLMConfig, args: argparse.Namespace, device: torch.device,
                       design: str, path: Path | None) -> TimeModel | None:
    """The time model fitted on ``design``'s calibration micro-batches (saved to ``path`` when given), or None
    when the fit is refused."""
    batches = calibration_batches(cfg, args, design, args.calibration)
    seconds = [time_micro_batch(model, b, device, args.calibration_reps or args.reps) for b in batches]
    samples = sum(b.num_samples for b in batches)
    try:
        fitted = fit_time_model(np.array([batch_features(b) for b in batches]), np.array(seconds),
                                made_for=bench_setting(cfg, device))
    except BalanceError as e:
        print(f"time model ({design}): fit failed: {e}")
        return None
    print(f"time model ({design}) fitted on {len(batches)} calibration micro-batches, {samples} samples (s per unit): "
          f"{describe(fitted)}; rms error {fitted.rms_error * 1e3:.1f} ms of mean {np.mean(seconds) * 1e3:.1f} ms"
          + (f"; saved {fitted.save(path)}" if path else ""))
    return fitted


def describe(model: TimeModel) -> str:
    """The model's coefficients (seconds per unit of each term) and fixed cost, for the log."""
    return ", ".join(f"{t} {c:.3g}" for t, c in zip(TERMS, model.coefficients)) + f", fixed {model.fixed_s:.3g} s"


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> None:
    cfg = load_model_config(name)
    if args.time_model:  # refused before any work when measured in another setting
        path, fits = args.time_model, {"loaded": TimeModel.load(args.time_model)}
        fits["loaded"].check_setting(bench_setting(cfg, device), f"time model {path}")
        print(f"time model loaded from {path} (fitted on {fits['loaded'].fitted_on} micro-batches, s per unit): "
              f"{describe(fits['loaded'])}")
    torch.manual_seed(0)
    model = VLM(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    warm = calibration_batches(cfg, args, "random", 1)[0]
    time_micro_batch(model, warm, device, reps=2)  # allocator and kernel warm-up
    if not args.time_model:
        path = Path(args.save_time_model or Path(tempfile.mkdtemp()) / f"time_model_{name}.json")
        fits = {design: fit_on_calibration(model, cfg, args, device, design, path if i == 0 else None)
                for i, design in enumerate(args.calibration_designs if args.calibration else [])}
    if args.fit_only:
        return
    fitted = next(iter(fits.values()), None)
    if fitted is None:
        print("no time model: balanced_fitted skipped, disttrain weighs tokens (cost=counts)")
    algorithms = [a for a in args.algorithms if fitted is not None or a != "balanced_fitted"]
    data = {a: sampler_steps(a, cfg, args, path if fitted else None) for a in algorithms}
    if fitted is not None:
        print("modelled (each micro-batch's time predicted by the model, no timing): idle, samples/s, at no idle")
        for algo in algorithms:
            idle, rate, no_idle = modelled(fitted, data[algo])
            print(f"  {algo:<16}{idle:>7.2%}{rate:>9.2f}{no_idle:>9.2f}")

    runs: dict[str, list[tuple[float, float, int, int, int]]] = {a: [] for a in algorithms}
    errors = {design: {a: [] for a in algorithms} for design, fit in fits.items() if fit is not None}
    timings: list[dict] = []  # every timed run: the refit's input and what --save-timings writes
    tokens = {a: sum(b.num_tokens for step in data[a] for work in step for b in work) for a in algorithms}
    samples = {a: sum(b.num_samples for step in data[a] for work in step for b in work) for a in algorithms}
    by_runs: dict[str, list[list[float]]] = {a: [] for a in algorithms}  # per repeat: idle by runs per micro-batch
    for r in range(args.repeats):
        timed: dict[str, list[list[list[list[float]]]]] = {a: [] for a in algorithms}  # [step][rank][mb][run] s
        for algo, i in timing_order({a: len(data[a]) for a in algorithms}, r):
            step = data[algo][i]
            timed[algo].append(time_step(model, step, device, args.reps))
            rows = [(k, m, batch_features(b), seconds) for k, (work, runs) in enumerate(zip(step, timed[algo][-1]))
                    for m, (b, seconds) in enumerate(zip(work, runs))]
            timings.extend({"sampler": algo, "repeat": r, "step": i, "rank": k, "micro_batch": m, "features": f,
                            "seconds": seconds} for k, m, f, seconds in rows)
            for design in errors:
                errors[design][algo].extend(signed_errors(fits[design], [f for _, _, f, _ in rows],
                                                          [min(seconds) for _, _, _, seconds in rows]))
        for algo in algorithms:
            step_s, ideal_s = step_and_ideal([fastest(step, args.reps) for step in timed[algo]])
            runs[algo].append((step_s, ideal_s, tokens[algo], samples[algo], len(data[algo])))
            by_runs[algo].append(idle_by_runs(timed[algo], args.reps))
    saved = {"model": name, "terms": list(TERMS), "runs": timings}
    if args.repeats:
        report(name, params, cfg, args, device, runs, errors, by_runs)
        refit_on_runs(measured_from_timings(saved), bench_setting(cfg, device))
    if args.save_timings:
        args.save_timings.write_text(json.dumps(saved))
        print(f"timings of {len(timings)} micro-batches saved to {args.save_timings}")


def signed_errors(model: TimeModel, features: list[list[float]], seconds: list[float]) -> list[float]:
    """(predicted - measured) / measured of each micro-batch: positive where the model over-prices it."""
    measured = np.asarray(seconds, np.float64)
    return ((model.predict(np.array(features)) - measured) / measured).tolist()


class UnderRefit(NamedTuple):
    """One sampler seen through the model refitted on every sampler's micro-batches: ``bias``, the median of
    (predicted - measured) / measured; ``idle``, the idle of its steps with each rank's time the refit's prediction
    (a fraction). Measured idle above ``idle`` is what no term of the model explains: timing noise, or a cost the
    terms do not count."""

    bias: float
    idle: float


Measured = dict[str, list[list[list[tuple[list[float], float]]]]]  # sampler: [step][rank][micro-batch] (features, s)


def refit_on_runs(measured: Measured, setting: dict[str, str]) -> dict[str, UnderRefit] | None:
    """Fit the time model on every micro-batch the samplers ran (``measured``: per sampler, per step, per rank, each
    micro-batch's features and fastest seconds) and print it with each sampler's bias and idle under it (returned;
    None when the fit is refused). In-sample, so a model whose terms count what the micro-batches cost leaves no
    sampler with a bias beyond timing noise."""
    rows = [row for steps in measured.values() for step in steps for work in step for row in work]
    try:
        refit = fit_time_model(np.array([f for f, _ in rows]), np.array([s for _, s in rows]), made_for=setting)
    except BalanceError as e:
        print(f"time model refitted on the samplers' micro-batches: fit failed: {e}")
        return None
    print(f"time model refitted on the {len(rows)} micro-batches the samplers ran (s per unit): {describe(refit)}; "
          f"rms error {refit.rms_error * 1e3:.1f} ms of mean {np.mean([s for _, s in rows]) * 1e3:.1f} ms")
    under = {}
    for algo, steps in measured.items():
        flat = [row for step in steps for work in step for row in work]
        bias = float(np.median(signed_errors(refit, [f for f, _ in flat], [s for _, s in flat])))
        step_s, ideal_s = step_and_ideal(priced(refit, [[[f for f, _ in work] for work in step] for step in steps]))
        under[algo] = UnderRefit(bias=bias, idle=1 - ideal_s / step_s)
    print("  under the refit, bias (median (predicted - measured) / measured) and idle of the steps as it prices "
          "them: " + ", ".join(f"{algo} {u.bias:+.1%} / {u.idle:.1%}" for algo, u in under.items()))
    return under


def measured_from_timings(saved: dict) -> Measured:
    """The per sampler, per step, per rank, per micro-batch (features, fastest seconds) that ``refit_on_runs``
    takes, from a file ``--save-timings`` wrote; steps in the order they were timed, each repeat's steps apart
    (a file written before ``--micro-batches`` has one micro-batch per rank)."""
    measured: dict[str, dict[tuple[int, int], dict[int, list[tuple[int, list[float], float]]]]] = {}
    for run in saved["runs"]:
        step = measured.setdefault(run["sampler"], {}).setdefault((run["repeat"], run["step"]), {})
        step.setdefault(run["rank"], []).append((run.get("micro_batch", 0), run["features"], min(run["seconds"])))
    return {algo: [[[(f, s) for _, f, s in sorted(work)] for _, work in sorted(ranks.items())]
                   for _, ranks in sorted(steps.items())]
            for algo, steps in measured.items()}


def timing_order(steps: dict[str, int], repeat: int) -> list[tuple[str, int]]:
    """(sampler, step index) in the order one repeat times them: step 0 of every sampler, then step 1, ..., the
    samplers' order rotated by ``repeat``. Interleaved so that a slow spell of a shared machine (minutes long) falls
    on every sampler's steps alike, not on one sampler's whole turn; a sampler with fewer steps drops out early."""
    names = list(steps)
    names = names[repeat % len(names):] + names[: repeat % len(names)]
    return [(name, i) for i in range(max(steps.values(), default=0)) for name in names if i < steps[name]]


def modelled(model: TimeModel, steps: list[Step]) -> tuple[float, float, float]:
    """What the time model predicts for these micro-batches (each one's time predicted, no timing), as the table
    measures it, a rank's time the sum of its micro-batches': the idle, 1 - (sum over steps of the mean rank's
    time) / (sum of the slowest rank's); samples/s (samples / the slowest ranks' time); and samples/s at no idle
    (samples / the mean ranks' time)."""
    step_s, ideal_s = step_and_ideal(priced(model, [[[batch_features(b) for b in work] for work in step]
                                                    for step in steps]))
    samples = sum(b.num_samples for step in steps for work in step for b in work)
    return 1 - ideal_s / step_s, samples / step_s, samples / ideal_s


def report(name: str, params: int, cfg: VLMConfig, args: argparse.Namespace, device: torch.device,
           runs: dict[str, list[tuple[float, float, int, int, int]]], errors: dict[str, dict[str, list[float]]],
           by_runs: dict[str, list[list[float]]]) -> None:
    """The table (model error columns: the first design whose fit was accepted), then each such model's error over
    all micro-batches run, each sampler's idle by the runs kept per micro-batch, then ``balanced``'s speedups."""
    rate = {a: [s / step for step, _, _, s, _ in rs] for a, rs in runs.items()}  # samples/s per repeat
    median = {a: statistics.median(v) for a, v in rate.items()}
    no_idle = {a: statistics.median(s / ideal for _, ideal, _, s, _ in rs) for a, rs in runs.items()}
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {cfg.tokens_per_tile} tokens/tile, DP={args.dp} simulated, "
          f"{args.micro_batches} micro-batch(es) per rank and step, {args.steps or 'all'} steps x {args.repeats} "
          f"repeats, {device.type}; medians over repeats, spread = min..max")
    print(f"{'sampler':<16}{'steps':>6}{'step s':>8}{'ideal s':>9}{'idle':>7}{'smp/step':>9}{'tok/step':>10}{'samples/s':>10}"
          f"{'spread':>18}{'vs random':>10}{'no idle':>9}{'model err':>11}{'p90':>6}{'bias':>7}")
    for algo, rs in runs.items():
        n = rs[0][4]
        step = statistics.median(r[0] for r in rs) / n
        ideal = statistics.median(r[1] for r in rs) / n
        idle = statistics.median(1 - r[1] / r[0] for r in rs)
        tokens, samples = rs[0][2] / n, rs[0][3] / n
        spread = f"{min(rate[algo]):.2f}..{max(rate[algo]):.2f}"
        vs = f"{median[algo] / median['random']:.2f}x" if "random" in median and algo != "identical" else "-"
        err = next(iter(errors.values()), {}).get(algo, [])
        err_s = (f"{np.median(np.abs(err)):>10.1%}{np.percentile(np.abs(err), 90):>7.0%}{np.median(err):>+7.1%}"
                 if err else f"{'-':>10}{'-':>7}{'-':>7}")
        print(f"{algo:<16}{n:>6}{step:>8.3f}{ideal:>9.3f}{idle:>7.1%}{samples:>9.1f}{tokens:>10,.0f}{median[algo]:>10.2f}"
              f"{spread:>18}{vs:>10}{no_idle[algo]:>9.2f}{err_s}")
    for design, per_algo in errors.items():
        err = np.abs([e for algo_err in per_algo.values() for e in algo_err])
        print(f"time model ({design}): |predicted - measured| / measured over the {len(err)} micro-batches run: "
              f"median {np.median(err):.1%}, p90 {np.percentile(err, 90):.1%}")
    if args.reps > 1:
        print(f"idle with each micro-batch's fastest of 1 .. {args.reps} runs (median over repeats; still falling at "
              f"{args.reps}: timing noise is part of the figure):")
        for algo, idles in by_runs.items():
            print(f"  {algo:<16}" + " ".join(f"{statistics.median(r[k] for r in idles):>7.2%}" for k in range(args.reps)))
    samplers = [a for a in median if not a.startswith("balanced") and a != "identical"]
    for ours in ("balanced", "balanced_fitted"):
        if ours in median and samplers:
            print(f"{ours} vs: " + ", ".join(f"{a} {median[ours] / median[a]:.2f}x" for a in samplers))
            print(f"{ours} at no idle vs: " + ", ".join(f"{a} {no_idle[ours] / median[a]:.2f}x" for a in samplers))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # a long run killed by a timeout keeps the rows it printed
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "internvl_100m"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches per DP rank and step (gradient accumulation); a rank's time is their sum")
    parser.add_argument("--steps", type=int, default=6,
                        help="steps measured per sampler and repeat; 0: every step of the epoch, so that with a small "
                             "--samples every sampler runs the same samples")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of the whole measurement (median, spread); 0: only the modelled idle")
    parser.add_argument("--reps", type=int, default=2, help="timed runs per micro-batch (the fastest counts)")
    parser.add_argument("--calibration", type=int, default=48, help="micro-batches timed to fit the model (0: none)")
    parser.add_argument("--calibration-reps", type=int, default=None,
                        help="timed runs per calibration micro-batch, the fastest counts (default: --reps); on a "
                             "noisy machine the fit needs more than the samplers' timing")
    parser.add_argument("--calibration-designs", nargs="+", default=["d_optimal"], choices=DESIGNS,
                        help="how calibration micro-batches are chosen; one model per design, the first is used")
    parser.add_argument("--save-time-model", type=Path, default=None, help="where to write the fitted model JSON")
    parser.add_argument("--fit-only", action="store_true", help="fit (and save) the time model, run no sampler")
    parser.add_argument("--time-model", type=Path, default=None,
                        help="a model saved by an earlier run's --save-time-model, used instead of calibrating "
                             "(--calibration ignored)")
    parser.add_argument("--save-timings", type=Path, default=None,
                        help="write every timed run (sampler, step, rank, features, seconds) to this JSON file")
    parser.add_argument("--refit-timings", type=Path, default=None,
                        help="a file --save-timings wrote: print the model refitted on its micro-batches and each "
                             "sampler's bias and idle under it, then stop (nothing is timed)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="system",
                        help="CPU memory: glibc's default, or heap: freed memory kept and reused (as a GPU's caching "
                             "allocator does)")
    parser.add_argument("--samples", type=int, default=20000, help="synthetic samples (embedded statistics)")
    parser.add_argument("--samples-per-group", type=int, default=2)
    parser.add_argument("--text-scale", type=float, default=0.25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.refit_timings:
        saved = json.loads(args.refit_timings.read_text())
        refit_on_runs(measured_from_timings(saved), {"model": saved["model"]})
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    device = torch.device(args.device)
    try:
        if args.allocator == "heap":
            keep_freed_memory()
        for name in args.models:
            bench_model(name, args, device)
    except OmniBalError as e:  # a refused time model or configuration: the message says what to change
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
