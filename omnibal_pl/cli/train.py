"""``omnibal-train``: train a VLM on balanced micro-batches with Lightning, configured by Hydra.

    omnibal-train                                    # the main job: tiny model, synthetic data, CPU
    omnibal-train model=internvl2_2b dataset=internvl dataset.meta=meta.json dataset.tokenizer=tok cluster=gpu8
    omnibal-train ckpt_path=outputs/train/<date>/<time>/checkpoints/last.ckpt
    omnibal-train run_dir=runs/a ckpt_path=auto      # start, or continue after a kill (torchrun --max-restarts, requeue)
    omnibal-train -m balance.algorithm=balanced,random trainer.max_steps=50
    omnibal-train cluster=cpu_pp2                    # 2 pipeline stages on 2 CPU processes (omnibal strategy)
    omnibal-train cluster=gpu8 cluster.strategy=omnibal cluster.pp=4 plan.use=plans/internvl2_2b.yaml

The run is resolved and built by :mod:`omnibal_pl.train.assemble`; docs/cli.md lists every key.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.errors import ConfigError
from omnibal_pl.train.artifacts import write_artifacts
from omnibal_pl.train.assemble import build_run, plan_for_launched_processes, resolve_run
from omnibal_pl.train.checkpoints import resolve_ckpt_path
from omnibal_pl.train.faults import collective_timeout, rank_and_step_on_failure
from omnibal_pl.train.schemas import parse_run_config


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Runs one training job from a composed config; returns the summary on global rank 0."""
    run_cfg = parse_run_config(cfg)
    if run_cfg.run_dir:
        run_dir = Path(run_cfg.run_dir)
    elif HydraConfig.initialized():
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    else:
        raise ConfigError("run_dir is not set and Hydra is not running: pass run_dir=<folder>")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = resolve_run(run_cfg, run_dir)
    trainer, module, datamodule = build_run(run)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_path = resolve_ckpt_path(run_cfg.ckpt_path, run_dir)
    start = time.perf_counter()
    with plan_for_launched_processes(run), rank_and_step_on_failure(trainer, collective_timeout(run_cfg.faults)):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    return write_artifacts(module, datamodule, run_dir, seconds)


def optimised_train(cfg: DictConfig) -> float | None:
    """The Hydra task of ``omnibal-train``: trains, and returns what a sweeper (``hydra/sweeper=optuna``) minimises:
    the last validation loss, else the final training loss (``summary["objective"]``; None off global rank 0)."""
    summary = train(cfg)
    return None if summary is None else summary["objective"]


main = hydra_app("train", "omnibal-train", optimised_train)

if __name__ == "__main__":
    main()
