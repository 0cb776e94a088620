"""Command-line choices of config groups checked before Hydra composes: an unknown option (``logger=xyz``,
``callbacks=[checkpoint,xyz]``, ``-m model=tiny,xyz``) is one line naming the key and the options that exist,
instead of Hydra's multi-line "Could not find" report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, OverrideType
from hydra.errors import HydraException

from omnibal_pl.conf import CONF_DIR
from omnibal_pl.errors import ConfigError


def _names(value: Any) -> Iterator[str]:
    """The option names a group override chooses: one, a list, or a sweep over either; none for null, an
    interpolation or a glob (Hydra resolves those itself)."""
    if isinstance(value, ChoiceSweep):
        for item in value.list:
            yield from _names(item)
    elif isinstance(value, list):
        for item in value:
            yield from _names(item)
    elif isinstance(value, str) and "${" not in value:
        yield value


def check_group_options(args: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Raises :class:`ConfigError` for the first command-line override ``<group>=<option>`` of a group of
    ``conf_dir`` (a folder of option files: ``logger``, ``callbacks``, ``model/sparsify``, ...) whose option has no
    file. Other arguments (flags, ``key.path=value``, groups outside ``conf_dir`` such as ``hydra/sweeper``, syntax
    errors) are left to Hydra."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except HydraException:
            continue
        group = conf_dir / override.key_or_group
        if override.type == OverrideType.DEL or not group.is_dir():
            continue
        for name in _names(override.value()):
            if not (group / f"{name}.yaml").is_file():
                options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
                raise ConfigError(f"{override.key_or_group}={name}: no such option; the options are {options}")
