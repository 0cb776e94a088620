"""``OmniBalDataModule``: dataset, statistics, caps, balanced sampler and packing DataLoader for Lightning.

    dm = OmniBalDataModule(dataset_cfg, BalanceConfig(dp=8), model=ModelSpec.from_config(vlm_cfg))
    trainer = L.Trainer(..., use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)

- dataset: ``kind: synthetic`` (samples shaped by the embedded statistics or ``paths``) or a Hydra
  node with ``_target_`` (``LlavaDataset``, ``InternVLDataset``);
- statistics: synthetic ones are the table itself; a real dataset's are computed once (rank 0, in
  ``prepare_data``) and cached next to its first data file as ``<file>.lengths-<fingerprint>.obl``;
  a cache whose data changed is rebuilt with a warning;
- caps: ``balance.vit_cap``/``token_cap`` or the algorithm's search on the statistics; the token cap
  is also the dataset's ``max_tokens`` (its ``overlong`` policy handles longer samples);
- sampler: :class:`~omnibal_pl.balance.sampler.BalancedSampler` for this process's *data-parallel*
  rank, read from ``trainer.strategy.distributed_sampler_kwargs`` (DDP, and the pipeline strategy,
  report DP rank and size there) unless given;
- resume: the DataModule's ``state_dict`` (stored in Lightning checkpoints) records seed, epoch and the
  micro-batches the fit loop has processed; after a restore the loader skips exactly those.

The Trainer must not wrap the loader in a DistributedSampler: pass ``use_distributed_sampler=False``
(``setup`` raises a :class:`ConfigError` saying so when it is left on in a distributed run). ``setup``
sets ``trainer.reload_dataloaders_every_n_epochs = 1``: Lightning sizes an epoch before calling
``set_epoch``, and every epoch's grouping has its own number of micro-batches.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from torch.utils.data import DataLoader, Dataset

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.sampler import BalancedBatchSampler, BalancedSampler
from omnibal_pl.balance.search import resolve_caps
from omnibal_pl.data.collate import PackingCollate
from omnibal_pl.data.length_source import dataset_lengths
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.synthetic_lengths import adapt_to_model, truncate_text
from omnibal_pl.errors import ConfigError
from omnibal_pl.lengths import LengthTable, load_lengths


@dataclass
class LoaderConfig:
    """DataLoader settings (workers run the dataset and the packing collate)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None


@dataclass
class PackingConfig:
    """How a group becomes a micro-batch: token padding (``cap`` | ``multiple`` | ``none``) and loss weighting
    (``token`` | ``sample`` | ``square``)."""

    pad_to: str = "cap"
    multiple: int = 64
    loss_weighting: str = "token"


@dataclass
class ModelSpec:
    """What the data pipeline needs to know of the model: vocabulary, tile size, tokens per tile."""

    vocab_size: int
    image_size: int
    tokens_per_tile: int
    image_context_id: int


class OmniBalDataModule(L.LightningDataModule):
    """Balanced, packed, resumable training data (see the module docstring)."""

    def __init__(
        self,
        dataset: Mapping[str, Any],
        balance: BalanceConfig,
        model: ModelSpec,
        packing: PackingConfig | None = None,
        loader: LoaderConfig | None = None,
        dp_rank: int | None = None,
        dp_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dataset_cfg = dict(dataset)
        self.balance = balance
        self.model_spec = model
        self.packing = packing or PackingConfig()
        self.loader = loader or LoaderConfig()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.dataset: Dataset | None = None
        self.lengths: LengthTable | None = None
        self.sampler: BalancedSampler | None = None
        self._pending_state: dict[str, int] | None = None

    # ------------------------------------------------------------------ building
    def prepare_data(self) -> None:
        """Computes and caches a real dataset's statistics (runs on one process per node)."""
        if self.dataset_cfg.get("kind") != "synthetic":
            self._real_lengths(self._build_real_dataset())

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        self._check_trainer_flags()
        if self.dataset_cfg.get("kind") == "synthetic":
            spec = self.model_spec
            lengths = adapt_to_model(dataset_lengths(self.dataset_cfg), spec.tokens_per_tile,
                                     float(self.dataset_cfg.get("text_scale", 1.0)))
            caps = resolve_caps(lengths, self.balance)
            if caps.token_cap:
                lengths = truncate_text(lengths, caps.token_cap, spec.tokens_per_tile)
            dataset = SyntheticDataset(lengths, spec.vocab_size, spec.image_size, spec.tokens_per_tile,
                                       spec.image_context_id, seed=int(self.dataset_cfg.get("seed", 0)))
        else:
            dataset = self._build_real_dataset()
            raw = self._real_lengths(dataset)
            caps = resolve_caps(raw, self.balance)
            if dataset.max_tokens is None:
                dataset.max_tokens = caps.token_cap
            lengths = dataset.apply_token_cap(raw)
        self.balance = replace(self.balance, vit_cap=caps.vit_cap or None, token_cap=caps.token_cap or None)
        if caps.vit_cap and int(lengths.vit.max()) > caps.vit_cap:
            # such a sample gets a group of its own that no micro-batch of the cap's shape can hold
            over = int((lengths.vit > caps.vit_cap).sum())
            raise ConfigError(f"{over} samples have more tiles than balance.vit_cap={caps.vit_cap} (largest: "
                              f"{int(lengths.vit.max())}); raise balance.vit_cap or lower the dataset's max_tiles")
        self.dataset, self.lengths = dataset, lengths
        rank, size = self._dp_rank_and_size()
        self.sampler = BalancedSampler(lengths, self.balance, rank, size)
        if self._pending_state is not None:
            self.sampler.load_state_dict(self._pending_state)
            self._pending_state = None

    def train_dataloader(self) -> DataLoader:
        if self.sampler is None:
            self.setup("fit")
        if self.trainer is not None:
            # Lightning sizes the epoch (len) before it calls set_epoch; an epoch's micro-batch count
            # depends on its grouping, so select the epoch first or the epoch would be cut short.
            self.sampler.set_epoch(self.trainer.current_epoch)
        spec = self.model_spec
        vit_cap, token_cap = self._shape_caps()
        collate = PackingCollate(token_cap, vit_cap, self.packing.pad_to, self.packing.multiple,
                                 self.packing.loss_weighting, image_context_id=spec.image_context_id,
                                 tokens_per_tile=spec.tokens_per_tile)
        workers = self.loader.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=BalancedBatchSampler(self.sampler),
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=self.loader.persistent_workers and workers > 0,
            prefetch_factor=self.loader.prefetch_factor if workers > 0 else None,
        )

    def _shape_caps(self) -> tuple[int, int]:
        """Tile and token caps of a micro-batch; the cap-free baselines pad to the epoch's largest group."""
        if self.balance.vit_cap is not None and self.balance.token_cap is not None:
            return int(self.balance.vit_cap), int(self.balance.token_cap)
        plan = self.sampler.plan()
        return plan.grouping.vit_cap, plan.grouping.token_cap

    def _dp_rank_and_size(self) -> tuple[int, int]:
        if self.dp_rank is not None:
            return self.dp_rank, self.dp_size if self.dp_size is not None else self.balance.dp
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            kwargs = trainer.strategy.distributed_sampler_kwargs or {}
            return int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", trainer.world_size))
        if trainer is not None:
            return 0, 1
        return 0, self.balance.dp  # no trainer: rank 0's share of a simulated DP run

    def _check_trainer_flags(self) -> None:
        trainer = self.trainer
        if trainer is not None and hasattr(trainer, "reload_dataloaders_every_n_epochs"):
            # a new loader (and length) per epoch: each epoch's grouping has its own number of micro-batches
            trainer.reload_dataloaders_every_n_epochs = 1
        connector = getattr(trainer, "_accelerator_connector", None)
        if connector is not None and connector.use_distributed_sampler and connector.is_distributed:
            raise ConfigError("OmniBalDataModule shards data by DP rank itself: create the Trainer with "
                              "use_distributed_sampler=False")

    # ------------------------------------------------------------------ real datasets
    def _build_real_dataset(self) -> Dataset:
        if "_target_" not in self.dataset_cfg:
            raise ConfigError(f"dataset {self.dataset_cfg.get('name')!r}: give kind: synthetic or a _target_ "
                              "dataset class (see conf/dataset/llava.yaml, internvl.yaml)")
        from hydra.utils import instantiate

        cfg = {k: v for k, v in self.dataset_cfg.items() if k not in ("name", "kind", "paths", "num_workers")}
        return instantiate(cfg, _convert_="object")

    def _real_lengths(self, dataset: Any) -> LengthTable:
        """Raw statistics from the cache next to the data, computing (and caching) them if missing or stale."""
        if self.dataset_cfg.get("paths"):
            return dataset_lengths(self.dataset_cfg)
        anchor = Path(dataset.files[0])
        cache = anchor.with_name(f"{anchor.name}.lengths-{dataset.fingerprint()}.obl")
        if cache.is_file():
            return load_lengths(cache)
        stale = sorted(anchor.parent.glob(f"{anchor.name}.lengths-*.obl"))
        if stale:
            warnings.warn(f"statistics cache {stale[-1]} no longer matches its data; rebuilding {cache}", stacklevel=2)
            for old in stale:
                old.unlink()
        table = dataset.raw_lengths(num_workers=int(self.dataset_cfg.get("num_workers", 0)), progress=True)
        table.save(cache)
        return table

    # ------------------------------------------------------------------ reporting and resume
    def balance_report(self, epoch: int | None = None) -> dict[str, Any]:
        """Balance metrics of an epoch (default: the current one) over all DP ranks."""
        if self.sampler is None:
            self.setup("fit")
        return self.sampler.report(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Sampler position, rank-independent: Lightning stores it in checkpoints (rank 0 writes)."""
        if self.sampler is None:
            return {}
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        if trainer is not None:
            self.sampler.set_epoch(trainer.current_epoch)
        return {"sampler": self.sampler.state_dict(batches_done=done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("sampler")
        if state is None:
            return
        if self.sampler is None:
            self._pending_state = state
        else:
            self.sampler.load_state_dict(state)
