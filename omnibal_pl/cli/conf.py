"""Hydra app plumbing shared by the console scripts: one entry-point wrapper over the packaged config tree."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from omnibal_pl.cli.group_options import check_group_options
from omnibal_pl.conf import HYDRA_PATH
from omnibal_pl.errors import OmniBalError
from omnibal_pl.launch_env import register_resolvers

# At import, not in main(): a job that hydra-submitit-launcher starts unpickles the task (importing this
# module) and resolves its config without running main().
register_resolvers()


def hydra_app(config_name: str, prog: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console-script entry that runs ``task`` as a Hydra app over ``conf/<config_name>.yaml``.

    A package error (:class:`OmniBalError`) prints ``<prog>: error: <message>`` and exits with status 2
    instead of a traceback; so does an unknown group option on the command line (``logger=xyz``), checked
    before Hydra composes (:func:`~omnibal_pl.cli.group_options.check_group_options`). Hydra names the job
    after ``task``'s module (it unwraps ``functools.wraps``).
    """

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> Any:
        try:
            return task(cfg)  # a sweeper optimises the value a task returns
        except OmniBalError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        try:
            check_group_options(sys.argv[1:])
        except OmniBalError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        hydra.main(version_base="1.3", config_path=HYDRA_PATH, config_name=config_name)(guarded)()

    return main
