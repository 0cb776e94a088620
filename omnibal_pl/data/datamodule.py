"""``OmniBalDataModule``: the balanced sampler and packing DataLoader of a run's resolved training data.

    data = prepare_training_data(dataset_cfg, BalanceConfig(dp=8), ModelSpec(...))   # before the Trainer
    dm = OmniBalDataModule(data)            # or OmniBalDataModule.from_config(dataset_cfg, balance, spec)
    trainer = L.Trainer(..., use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm)

- data: a :class:`~omnibal_pl.data.training_data.TrainingData` (dataset, statistics, caps resolved
  for the run's DP size), made before the Trainer exists, so the plan and the DataModule share one shape;
- sampler: :class:`~omnibal_pl.balance.sampler.BalancedSampler` for this process's *data-parallel*
  rank, read from ``trainer.strategy.distributed_sampler_kwargs`` (DDP, and the pipeline strategy,
  report DP rank and size there) unless given; the DP size must be the one the caps were resolved for;
- loader items: one micro-batch (:class:`~omnibal_pl.batch.PackedBatch`), or with ``whole_steps`` the
  list of a step's ``balance.micro_batches`` micro-batches (the pipeline module's batch);
- validation (``data.val``, the held-out split): the same sampler, collate and loader items over the held-out
  samples, epoch 0's arrangement every time (:meth:`val_dataloader`);
- resume: the DataModule's ``state_dict`` (stored in Lightning checkpoints) records seed, epoch and the
  micro-batches the fit loop has processed; after a restore the loader skips exactly those. The training
  loader (:class:`ResumableDataLoader`) implements Lightning's stateful-loader protocol with that state, so
  Lightning also records it in the fit loop's state and restores it into the loader it builds on resume.

The Trainer must not wrap the loader in a DistributedSampler: pass ``use_distributed_sampler=False``
(``setup`` raises a :class:`ConfigError` saying so when it is left on in a distributed run). ``setup``
sets ``trainer.reload_dataloaders_every_n_epochs = 1``: Lightning sizes an epoch before calling
``set_epoch``, and every epoch's grouping has its own number of micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import lightning as L
from torch.utils.data import DataLoader, Dataset

from omnibal_pl.balance.config import BalanceConfig
from omnibal_pl.balance.metrics import dist_ratio
from omnibal_pl.balance.sampler import BalancedBatchSampler, BalancedSampler
from omnibal_pl.data.collate import GroupsDataset, PackingCollate, StepCollate
from omnibal_pl.data.datasets import pixel_norm_of
from omnibal_pl.data.training_data import ModelSpec, TrainingData, prepare_training_data
from omnibal_pl.errors import ConfigError


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


class ResumableDataLoader(DataLoader):
    """The training loader: Lightning's stateful-loader protocol (``state_dict`` / ``load_state_dict``) over its
    DataModule's sampler position (read from the fit loop's progress, not from what the loader has prefetched)."""

    def __init__(self, *args: Any, datamodule: "OmniBalDataModule", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state)


class OmniBalDataModule(L.LightningDataModule):
    """Balanced, packed, resumable training data (see the module docstring)."""

    def __init__(self, data: TrainingData, packing: PackingConfig | None = None, loader: LoaderConfig | None = None,
                 whole_steps: bool = False, dp_rank: int | None = None) -> None:
        super().__init__()
        self.data = data
        self.balance = data.balance
        self.dataset, self.lengths = data.dataset, data.lengths
        self.packing = packing or PackingConfig()
        self.loader = loader or LoaderConfig()
        self.whole_steps = whole_steps
        self.dp_rank = dp_rank
        self.sampler: BalancedSampler | None = None
        self.val_sampler: BalancedSampler | None = None
        self._pending_state: dict[str, int] | None = None

    @classmethod
    def from_config(cls, dataset: Mapping[str, Any], balance: BalanceConfig, model: ModelSpec,
                    packing: PackingConfig | None = None, loader: LoaderConfig | None = None,
                    whole_steps: bool = False, dp_rank: int | None = None) -> "OmniBalDataModule":
        """Prepares the data of config ``dataset`` (caps for ``balance.dp`` DP ranks) and wraps it."""
        return cls(prepare_training_data(dataset, balance, model), packing, loader, whole_steps, dp_rank)

    # ------------------------------------------------------------------ building
    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        self._check_trainer_flags()
        rank, size = self._dp_rank_and_size()
        if size != self.balance.dp:
            raise ConfigError(f"the data's caps were resolved for {self.balance.dp} data-parallel ranks, the run has "
                              f"{size}; prepare the data with balance.dp={size}")
        self.sampler = BalancedSampler(self.lengths, self.balance, rank, size)
        if self.data.val is not None:
            self.val_sampler = BalancedSampler(self.data.val.lengths, self.balance, rank, size)
            if self.val_sampler.micro_batches_per_epoch(0) == 0:
                raise ConfigError(f"the validation data (dataset.val_fraction or dataset.val_*) has {len(self.data.val.lengths)} "
                                  f"samples, too few for one step of {self.balance.micro_batches} micro-batches on {size} DP "
                                  "ranks; hold out more")
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
        return self._loader(self.dataset, self.sampler, ResumableDataLoader, datamodule=self)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out samples, grouped, balanced and packed as for training (epoch 0's arrangement); no
        loader (an empty list, which Lightning skips) without held-out data (``dataset.val_fraction`` 0)."""
        if self.sampler is None:
            self.setup("fit")
        if self.val_sampler is None:
            return []
        return self._loader(self.data.val.dataset, self.val_sampler)

    def _loader(self, dataset: Dataset, sampler: BalancedSampler, loader_class: type[DataLoader] = DataLoader,
                **loader_args: Any) -> DataLoader:
        spec = self.data.model
        vit_cap, token_cap = self._shape_caps()
        collate = PackingCollate(token_cap, vit_cap, self.packing.pad_to, self.packing.multiple,
                                 self.packing.loss_weighting, image_context_id=spec.image_context_id,
                                 tokens_per_tile=spec.tokens_per_tile, spatial_merge=spec.merge,
                                 pixel_norm=pixel_norm_of(dataset))
        if self.whole_steps:
            dataset, collate = GroupsDataset(dataset), StepCollate(collate)
        workers = self.loader.num_workers
        return loader_class(
            dataset,
            batch_sampler=BalancedBatchSampler(sampler, self.whole_steps),
            collate_fn=collate,
            num_workers=workers,
            pin_memory=self.loader.pin_memory,
            persistent_workers=self.loader.persistent_workers and workers > 0,
            prefetch_factor=self.loader.prefetch_factor if workers > 0 else None,
            **loader_args,
        )

    def _shape_caps(self) -> tuple[int, int]:
        """Tile and token caps of a micro-batch; the cap-free baselines pad to the epoch's largest group."""
        if self.balance.vit_cap is not None and self.balance.token_cap is not None:
            return int(self.balance.vit_cap), int(self.balance.token_cap)
        arrangement = self.sampler.arrangement()
        return arrangement.grouping.vit_cap, arrangement.grouping.token_cap

    def _dp_rank_and_size(self) -> tuple[int, int]:
        if self.dp_rank is not None:
            return self.dp_rank, self.balance.dp
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

    @property
    def micro_batches_per_item(self) -> int:
        """Micro-batches in one loader item: the step's when items are whole steps, else one."""
        return self.balance.micro_batches if self.whole_steps else 1

    def step_balance(self, items_before: int) -> dict[str, float]:
        """The spread of tiles and tokens over DP ranks of the step that ends with loader item number
        ``items_before + 1`` of the current epoch (``items_before``: items the fit loop finished before it)."""
        arrangement = self.sampler.arrangement()
        step = (items_before + 1) * self.micro_batches_per_item // self.balance.micro_batches - 1
        if not 0 <= step < arrangement.steps.num_steps:
            return {}
        vit, tokens = arrangement.step_loads(step)
        return {"balance/vit_dist": dist_ratio(vit[None]), "balance/llm_dist": dist_ratio(tokens[None])}

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
        items = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        done = items * self.micro_batches_per_item
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
