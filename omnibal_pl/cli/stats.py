"""``omnibal-stats``: compute a dataset's LengthTable without decoding pixels and save it (.obl).

A Hydra app over ``conf/stats.yaml``; the dataset comes from the ``dataset`` group, e.g.
``omnibal-stats dataset=internvl dataset.meta=meta.json dataset.tokenizer=tok/ output=lengths.obl``.
The statistics are uncapped (one row per annotation record): the token cap is applied when training.
"""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from omnibal_pl.cli.conf import hydra_app
from omnibal_pl.config import check_keys
from omnibal_pl.errors import ConfigError


def run(cfg: DictConfig) -> Path:
    """Builds the dataset, computes its statistics and writes them; returns the written path."""
    check_keys(cfg, ["dataset", "output", "num_workers", "progress"], "omnibal-stats")
    dataset = instantiate(cfg.dataset)
    if not hasattr(dataset, "raw_lengths"):
        raise ConfigError(f"dataset {type(dataset).__name__} has no annotation records to compute statistics for")
    table = dataset.raw_lengths(num_workers=cfg.num_workers, progress=cfg.progress)
    path = table.save(cfg.output)
    print(f"{path}: {len(table)} samples, {table.total_vit} tiles, {table.total_tokens} tokens, "
          f"sources {table.sources}")
    return path


main = hydra_app("stats", "omnibal-stats", run)

if __name__ == "__main__":
    main()
