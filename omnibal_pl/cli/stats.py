"""``omnibal-stats``: compute a dataset's LengthTable without decoding pixels and save it (.obl).

A Hydra app over ``conf/stats.yaml``; the dataset comes from the ``dataset`` group, e.g.
``omnibal-stats dataset=internvl dataset.meta=meta.json dataset.tokenizer=tok/ output=lengths.obl``.
The statistics are uncapped (one row per annotation record): the token cap is applied when training.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from omnibal_pl.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def run(cfg: DictConfig) -> Path:
    """Builds the dataset, computes its statistics and writes them; returns the written path."""
    dataset = instantiate(cfg.dataset)
    if not hasattr(dataset, "raw_lengths"):
        raise ConfigError(f"dataset {type(dataset).__name__} has no annotation records to compute statistics for")
    table = dataset.raw_lengths(num_workers=cfg.num_workers, progress=cfg.progress)
    path = table.save(cfg.output)
    print(f"{path}: {len(table)} samples, {table.total_vit} tiles, {table.total_tokens} tokens, "
          f"sources {table.sources}")
    return path


def main() -> None:
    if not (CONF_DIR / "stats.yaml").is_file():
        raise ConfigError(f"{CONF_DIR / 'stats.yaml'} not found: omnibal-stats reads the repository's conf/ folder; "
                          "install omnibal_pl from a checkout (pip install -e .)")
    hydra.main(config_path=str(CONF_DIR), config_name="stats", version_base="1.3")(run)()


if __name__ == "__main__":
    main()
