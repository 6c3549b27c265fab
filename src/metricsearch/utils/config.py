"""Small helpers around Hydra / OmegaConf configs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"
# Groups whose absence is a valid choice; `group=null` on the command line selects the group's `none` option.
NULLABLE_GROUPS = ("miner", "scheduler", "sampler", "logger")


def normalize_overrides(args: Sequence[str]) -> list[str]:
    """Rewrites ``miner=null`` into ``miner=none`` and ``data.root=PATH`` into ``data.source.root=PATH``.

    Hydra 1.3 rejects a null value for a config group on the command line ("Config group override must be a
    string or a list"), yet ``miner=null`` is what a user types to switch the miner off.
    """
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "data.root":
            key = "data.source.root"  # shorthand: every dataset reader takes its folder as `root`
        if sep and key.lstrip("+") in NULLABLE_GROUPS:
            value = ",".join("none" if v.strip() == "null" else v for v in value.split(","))
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out


def instantiate_partial_with(cfg: DictConfig | dict | None, **runtime: Any) -> Any:
    """Instantiates ``cfg`` and, when it is a partial, completes it with the runtime values its target accepts.

    Losses need ``num_classes`` and ``embedding_size`` only if they have proxies or class weights; passing
    exactly the arguments the constructor takes keeps every loss config free of runtime values.
    """
    if cfg is None:
        return None
    obj = instantiate(cfg)
    if not isinstance(obj, functools.partial):
        return obj
    accepted = _constructor_parameters(obj.func)
    return obj(**{k: v for k, v in runtime.items() if k in accepted and k not in obj.keywords})


def to_plain(cfg: DictConfig | None) -> Any:
    """A resolved plain-Python copy of ``cfg`` (for JSON, checkpoints and loggers)."""
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def _constructor_parameters(target: Any) -> set[str]:
    """Names a class (or function) accepts, following ``*args, **kwargs`` up the class hierarchy.

    Some losses (e.g. CosFaceLoss) declare only their own arguments and forward the rest to a parent class.
    """
    if not inspect.isclass(target):
        return set(inspect.signature(target).parameters)
    names: set[str] = set()
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names
