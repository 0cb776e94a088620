"""What a finished run leaves in its directory beside Lightning's files: the balance report and plot of
epoch 0, the loss plot, ``summary.json``, and the summary table printed at the end."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omnibal_pl.balance.report import plot_balance, write_json
from omnibal_pl.data.datamodule import OmniBalDataModule
from omnibal_pl.data.skips import add_counts, describe
from omnibal_pl.train.module import VLMTrainingModule


def summarize(module: VLMTrainingModule, datamodule: OmniBalDataModule, run_dir: Path, seconds: float) -> dict[str, Any]:
    """The run's summary: loss start/end, the last validation loss (NaN without validation), ``objective`` (that
    validation loss, else the final training loss), throughput (means over every optimizer step, whatever the
    loggers and ``log_every_n_steps``), the balance of epoch 0 and ``skipped``: samples left out, by reason (at
    start, and every time a loader dropped one: a sample whose image does not decode is dropped every epoch).

    A resumed run's summary covers the whole run (:class:`~omnibal_pl.train.run_record.RunRecord`): its steps,
    losses and means include the earlier attempts' up to the checkpoint resumed from; ``attempts`` and
    ``resumed_at`` (global steps) say how it went; ``seconds`` is this attempt's wall time, ``run_seconds`` adds the
    earlier attempts' training time up to that checkpoint."""
    record = module.record
    losses = record.losses
    report = datamodule.balance_report(0)
    mean = record.mean
    head = losses[: max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    loss_end = sum(tail) / len(tail) if losses else float("nan")
    val_loss = module.validation.last.get("val/loss", float("nan"))
    return {
        "steps": len(losses),
        "skipped_steps": module.nonfinite.skipped,  # non-finite loss or gradient norm (faults.max_nonfinite_steps)
        "skipped": skipped_samples(module, datamodule),
        "val_skipped": {k.removeprefix("val/skipped/"): int(v) for k, v in module.validation.last.items()
                        if k.startswith("val/skipped/") and v},  # the last validation pass's loader drops
        "loss_start": sum(head) / len(head) if losses else float("nan"),
        "loss_end": loss_end,
        "val_loss": val_loss,
        "objective": val_loss if val_loss == val_loss else loss_end,  # what a sweeper minimises (NaN != NaN)
        "tokens_per_s": mean("train/tokens_per_s"),
        "samples_per_s": mean("train/samples_per_s"),
        "tiles_per_s": mean("train/tiles_per_s"),
        "mfu": mean("train/mfu"),
        "seconds": seconds,
        "attempts": record.attempts,
        "resumed_at": list(record.resumed_at),
        "run_seconds": record.seconds_before + seconds,
        "vit_cap": report["vit_cap"],
        "token_cap": report["token_cap"],
        "vit_dist_ratio": report["vit_dist_ratio"],
        "llm_dist_ratio": report["llm_dist_ratio"],
        "vit_fill": report["vit_fill"],
        "token_fill": report["token_fill"],
        "algorithm": report["algorithm"],
    }


def skipped_samples(module: VLMTrainingModule, datamodule: OmniBalDataModule) -> dict[str, int]:
    """Samples left out by reason: at start (``TrainingData.skipped``) plus dropped by the loaders of all ranks."""
    return add_counts(datamodule.data.skipped.counts, module.meter.dropped_total)


def write_artifacts(module: VLMTrainingModule, datamodule: OmniBalDataModule, run_dir: Path, seconds: float) -> dict:
    """Balance report (with the samples left out) and plot, loss plot, summary JSON; prints the summary table."""
    report = {**datamodule.balance_report(0), "skipped": skipped_samples(module, datamodule)}
    write_json(report, run_dir / "balance_report.json")
    arrangement = datamodule.sampler.arrangement(0)
    plot_balance(datamodule.lengths, arrangement.grouping, arrangement.steps, run_dir / "balance.png")
    _plot_loss(module.losses, run_dir / "loss.png")
    summary = summarize(module, datamodule, run_dir, seconds)
    write_json(summary, run_dir / "summary.json")
    mfu = f"{summary['mfu']:.3f}" if summary["mfu"] == summary["mfu"] else "n/a (cluster.peak_tflops unset)"
    rows = [("steps", f"{summary['steps']}"),
            ("loss start -> end", f"{summary['loss_start']:.4f} -> {summary['loss_end']:.4f}"),
            *([("val loss (last)", f"{summary['val_loss']:.4f}")] if summary["val_loss"] == summary["val_loss"] else []),
            ("tokens/s", f"{summary['tokens_per_s']:,.0f}"), ("samples/s", f"{summary['samples_per_s']:,.1f}"),
            ("tiles/s", f"{summary['tiles_per_s']:,.1f}"), ("MFU", mfu),
            ("balance", f"{summary['algorithm']} caps {summary['vit_cap']} tiles / {summary['token_cap']} tokens"),
            ("vit / llm dist ratio", f"{summary['vit_dist_ratio']:.4f} / {summary['llm_dist_ratio']:.4f}"),
            ("vit / token fill", f"{summary['vit_fill']:.3f} / {summary['token_fill']:.3f}"),
            ("samples left out", describe(summary["skipped"])),
            *([("attempts", f"{summary['attempts']} (resumed at step {', '.join(map(str, summary['resumed_at']))})")]
              if summary["attempts"] > 1 else []),
            ("wall time (s)", f"{seconds:.1f}" + (f" (the run: {summary['run_seconds']:.1f})" if summary["attempts"] > 1
                                                  else "")),
            ("run directory", str(run_dir))]
    print("\n".join(f"{k:<24}{v}" for k, v in rows))
    return summary


def _plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss (global, weighted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
