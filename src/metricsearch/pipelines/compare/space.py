"""The comparison's settings: each loss's search space (``conf/compare/<loss>.yaml``) and the protocol shared by
every loss (``conf/compare/protocol.yaml``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from metricsearch.utils.config import CONFIG_DIR, REPO_ROOT, ConfigError

if TYPE_CHECKING:
    import optuna

SPACE_DIR = CONFIG_DIR / "compare"
PROTOCOL_FILE = SPACE_DIR / "protocol.yaml"
_PARAM_KINDS = ("float", "int", "categorical")


class CompareError(ConfigError):
    """A comparison that cannot run as asked (a search space, a study run with other settings, failing trials)."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a Hydra key and its range (``low``..``high``, log-uniform when ``log``) or choices."""

    name: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A loss's search space: its conf/loss name, its parameters, and overrides every run of it gets (a miner's
    margin tied to the loss's, say)."""

    loss: str
    params: tuple[ParamSpec, ...]
    overrides: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "params": [asdict(p) for p in self.params], "overrides": list(self.overrides)}


def parse_search_space(loss: str, mapping: Mapping[str, Any], source: str = "") -> SearchSpace:
    """A :class:`SearchSpace` from the mapping of a ``conf/compare/<loss>.yaml`` file.

    Each parameter is ``KEY: {low: A, high: B}`` (a float; ``log: true`` for log-uniform, ``type: int`` for an
    integer) or ``KEY: {choices: [...]}``.

    Raises:
        CompareError: a malformed entry, naming the file, the parameter and what to write instead.
    """
    where = source or f"conf/compare/{loss}.yaml"
    params = []
    for name, spec in (mapping.get("params") or {}).items():
        if not isinstance(spec, Mapping):
            raise CompareError(f"{where}: parameter {name} must be a mapping like {{low: 0.0, high: 1.0}}")
        kind = str(spec.get("type", "categorical" if "choices" in spec else "float"))
        if kind not in _PARAM_KINDS:
            raise CompareError(f"{where}: parameter {name} has type {kind}; use one of {', '.join(_PARAM_KINDS)}")
        if kind == "categorical":
            choices = tuple(spec.get("choices") or ())
            if not choices:
                raise CompareError(f"{where}: parameter {name} needs a non-empty choices list")
            params.append(ParamSpec(name, kind, choices=choices))
            continue
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise CompareError(
                f"{where}: parameter {name} needs numbers low and high, e.g. {{low: 0.0, high: 1.0}}"
            ) from None
        log = bool(spec.get("log", False))
        if not low < high or (log and low <= 0):
            raise CompareError(
                f"{where}: parameter {name} has low={low}, high={high}; low must be below high (and above 0 "
                "with log: true)"
            )
        params.append(ParamSpec(name, kind, low, high, log))
    if not params:
        raise CompareError(f"{where} searches no parameters; add some under params:")
    overrides = tuple(str(o) for o in mapping.get("overrides") or ())
    return SearchSpace(str(mapping.get("loss") or loss), tuple(params), overrides)


def load_search_space(loss: str, space_dir: Path = SPACE_DIR) -> SearchSpace:
    """The search space of ``loss`` from ``conf/compare/<loss>.yaml``.

    Raises:
        CompareError: no such file (the message lists the losses that have one).
    """
    path = space_dir / f"{loss}.yaml"
    if not path.is_file():
        known = ", ".join(available_losses(space_dir)) or "none"
        raise CompareError(f"no search space for loss {loss} (conf/compare/{loss}.yaml); losses with one: {known}")
    mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return parse_search_space(
        loss, mapping, source=str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    )


def available_losses(space_dir: Path = SPACE_DIR) -> list[str]:
    """The losses with a search space in ``space_dir``."""
    return sorted(p.stem for p in space_dir.glob("*.yaml") if p.name != PROTOCOL_FILE.name)


def sample_params(trial: optuna.trial.BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """The trial's setting of every parameter of ``space`` (Optuna's suggest calls, named by the Hydra key)."""
    params: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "categorical":
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return params


def params_key(params: Mapping[str, Any]) -> str:
    """A short hash naming a parameter setting's folder: equal settings (in any order) share it.

    Example:
        >>> params_key({"loss.margin": 0.1}) == params_key({"loss.margin": 0.1})
        True
    """
    canonical = json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:12]


def param_overrides(params: Mapping[str, Any]) -> list[str]:
    """Hydra overrides setting ``params`` (floats in full precision, so a run's config matches its trial)."""
    return [f"{key}={_override_value(value)}" for key, value in params.items()]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Protocol:
    """The comparison's settings: ``conf/compare/protocol.yaml`` with the command line's values applied."""

    losses: tuple[str, ...]
    datasets: tuple[str, ...]
    trials: int
    folds: int
    seeds: tuple[int, ...]
    search_seed: int = 0
    epochs: int | None = None
    synthetic_epochs: int | None = None
    image_size: int | None = None
    monitor: str = "val/map@r"
    workers: int = 1
    prune: bool = False
    prune_startup_trials: int = 3
    sampler_seed: int = 0
    startup_trials: int = 4
    storage: str | None = None
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    max_failures: int = 3
    include_default: bool = False
    dataset_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def epochs_for(self, dataset: str) -> int | None:
        if self.epochs is not None:
            return self.epochs
        return self.synthetic_epochs if dataset == "synthetic" else None


def load_protocol(path: Path = PROTOCOL_FILE, **values: Any) -> Protocol:
    """The protocol of ``path`` with ``values`` (the command line's; None: keep the file's) applied.

    Raises:
        CompareError: a value that cannot work (fewer than 2 folds, no trials, no seeds, no workers).
    """
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw.update({k: v for k, v in values.items() if v is not None})
    known = {f for f in Protocol.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CompareError(f"{path.name}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    raw["losses"] = tuple(raw.get("losses") or ())
    raw["datasets"] = tuple(raw.get("datasets") or ())
    raw["seeds"] = tuple(int(s) for s in raw.get("seeds") or ())
    raw["dataset_overrides"] = {k: tuple(v or ()) for k, v in (raw.get("dataset_overrides") or {}).items()}
    protocol = Protocol(**raw)
    if protocol.trials < 1:
        raise CompareError(f"trials={protocol.trials}: a study needs at least 1 trial per loss")
    if protocol.folds < 2:
        raise CompareError(f"folds={protocol.folds}: cross-validation needs at least 2 class-disjoint folds (e.g. 4)")
    if not protocol.seeds:
        raise CompareError("seeds= is empty: the final runs need at least one seed, e.g. seeds=0")
    if protocol.workers < 1:
        raise CompareError(f"workers={protocol.workers}: at least 1 worker")
    return protocol
