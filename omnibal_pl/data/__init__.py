"""Datasets, tiling, tokenisation, length statistics and packing: samples in, packed micro-batches out."""
from omnibal_pl.data.collate import GroupsDataset, PackingCollate, StepCollate
from omnibal_pl.data.datamodule import LoaderConfig, OmniBalDataModule, PackingConfig
from omnibal_pl.data.datasets import ConversationDataset, InternVLDataset, LlavaDataset, Sample, SkipReport
from omnibal_pl.data.records import Record, read_annotation, read_internvl_meta
from omnibal_pl.data.stats import compute_lengths
from omnibal_pl.data.synthetic import SyntheticDataset
from omnibal_pl.data.synthetic_lengths import adapt_to_model, synthetic_lengths
from omnibal_pl.data.training_data import ModelSpec, TrainingData, prepare_training_data
from omnibal_pl.data.templates import ChatTokenizer, TemplateConfig, TextTokenizer, load_tokenizer
from omnibal_pl.data.tiling import TilingConfig, count_tiles, tile_grid, tile_image

__all__ = [
    "ChatTokenizer",
    "ConversationDataset",
    "GroupsDataset",
    "InternVLDataset",
    "LlavaDataset",
    "LoaderConfig",
    "ModelSpec",
    "OmniBalDataModule",
    "PackingCollate",
    "PackingConfig",
    "Record",
    "Sample",
    "SkipReport",
    "StepCollate",
    "SyntheticDataset",
    "TrainingData",
    "TemplateConfig",
    "TextTokenizer",
    "TilingConfig",
    "adapt_to_model",
    "compute_lengths",
    "count_tiles",
    "load_tokenizer",
    "prepare_training_data",
    "read_annotation",
    "read_internvl_meta",
    "synthetic_lengths",
    "tile_grid",
    "tile_image",
]
