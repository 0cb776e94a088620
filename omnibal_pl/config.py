"""Typed configuration: Hydra/OmegaConf nodes checked against the package's dataclass schemas."""
from __future__ import annotations

from typing import Any, TypeVar

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
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {reason}; valid keys and types are those of {schema.__name__}") from None
