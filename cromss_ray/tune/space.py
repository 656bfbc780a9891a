"""The search space: config ``SearchDomain`` leaves as Ray Tune domains, and samples back as configs.

A sweep searches ``PretrainConfig`` leaves named by dotted keys (``optim.lr``,
``cromss.final_ratio``); an element of a list leaf is named by its index
(``cromss.smoothing_factors.0``). The Tune parameter space is flat and keyed by the same
dotted names, so a trial's config, the results table and the MLflow params all use the
names of the YAML file.

Semantics per search algorithm:

- ``random``: ``choice``/``uniform``/``loguniform``/``randint`` are sampled, ``grid`` values
  are all enumerated; Tune runs ``num_samples`` samples of every grid point.
- ``grid``: ``grid`` and ``choice`` values are all enumerated (the full cross product,
  repeated ``num_samples`` times); continuous domains have no grid and are refused.
- ``optuna``: TPE samples every domain; ``grid`` is refused (Optuna has no grid), as are
  choices that are not plain scalars.

``randint`` bounds are both inclusive, like the ranges of ``uniform``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray import tune

from cromss_ray.config import ConfigError, PretrainConfig, SearchDomain, build_config

SCALAR_TYPES = (str, int, float, bool, type(None))


def _key_error(key: str, message: str) -> ConfigError:
    return ConfigError(f"tune.search_space.{key}: {message}")


def _check_bounds(key: str, domain: SearchDomain) -> None:
    if domain.uniform is not None and not domain.uniform[0] < domain.uniform[1]:
        raise _key_error(key, f"uniform needs low < high (got {list(domain.uniform)})")
    if domain.loguniform is not None and not 0 < domain.loguniform[0] < domain.loguniform[1]:
        raise _key_error(key, f"loguniform needs 0 < low < high (got {list(domain.loguniform)})")
    if domain.randint is not None and not domain.randint[0] <= domain.randint[1]:
        raise _key_error(key, f"randint needs low <= high (got {list(domain.randint)})")
    for kind in ("choice", "grid"):
        values = getattr(domain, kind)
        if values is not None and not values:
            raise _key_error(key, f"{kind} needs at least one value")


def to_tune_domain(key: str, domain: SearchDomain, search_alg: str) -> Any:
    """One ``SearchDomain`` as the Ray Tune domain that ``search_alg`` samples (module docstring)."""
    _check_bounds(key, domain)
    if search_alg == "optuna":
        if domain.grid is not None:
            raise _key_error(key, "grid domains need search_alg 'random' or 'grid' (use choice with optuna)")
        if domain.choice is not None and not all(isinstance(v, SCALAR_TYPES) for v in domain.choice):
            raise _key_error(
                key,
                "optuna chooses among plain values only (strings, numbers, booleans); "
                "search list elements by index instead, e.g. cromss.smoothing_factors.0",
            )
    if search_alg == "grid" and domain.grid is None and domain.choice is None:
        raise _key_error(key, "search_alg 'grid' needs grid or choice values (a range has no grid)")
    if domain.grid is not None:
        return tune.grid_search(list(domain.grid))
    if domain.choice is not None:
        if search_alg == "grid":
            return tune.grid_search(list(domain.choice))
        return tune.choice(list(domain.choice))
    if domain.uniform is not None:
        return tune.uniform(*domain.uniform)
    if domain.loguniform is not None:
        return tune.loguniform(*domain.loguniform)
    low, high = domain.randint  # type: ignore[misc]  # SearchDomain guarantees exactly one is set
    return tune.randint(low, high + 1)


def param_space(search_space: Mapping[str, SearchDomain], search_alg: str) -> dict[str, Any]:
    """The flat Tune ``param_space`` for a config's ``tune.search_space``."""
    return {key: to_tune_domain(key, domain, search_alg) for key, domain in search_space.items()}


def expected_trials(search_space: Mapping[str, SearchDomain], search_alg: str, num_samples: int) -> int:
    """How many trials the whole sweep creates: ``num_samples`` times the size of its grid."""
    grid_size = 1
    for domain in search_space.values():
        if domain.grid is not None:
            grid_size *= len(domain.grid)
        elif domain.choice is not None and search_alg == "grid":
            grid_size *= len(domain.choice)
    return num_samples * grid_size


def _set_leaf(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in a dumped config; an integer part indexes a list leaf."""
    *parents, last = key.split(".")
    node: Any = tree
    try:
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict) and last in node:
            node[last] = value
        else:
            raise KeyError(last)
    except (KeyError, IndexError, ValueError, TypeError):
        raise ConfigError(f"{key}: not a pretraining config key or list element") from None


def apply_sample(base: PretrainConfig, sample: Mapping[str, Any]) -> PretrainConfig:
    """The pretraining config of one trial: ``base`` with the sampled leaves replaced and re-validated."""
    tree = base.model_dump(mode="json")
    for key, value in sample.items():
        _set_leaf(tree, key, value.item() if hasattr(value, "item") else value)
    return build_config(PretrainConfig, tree)


def _probe_values(domain: SearchDomain) -> list[Any]:
    """The values that bound a domain: every listed value, or both ends of a range."""
    if domain.choice is not None:
        return list(domain.choice)
    if domain.grid is not None:
        return list(domain.grid)
    bounds = domain.uniform or domain.loguniform or domain.randint
    return list(bounds)  # type: ignore[arg-type]  # exactly one domain kind is set


def check_space(base: PretrainConfig, search_space: Mapping[str, SearchDomain]) -> None:
    """Refuse a space whose values the pretraining config rejects, before any trial starts.

    Every listed value and both ends of every range are applied to ``base`` one key at a
    time; an invalid one raises ``ConfigError`` naming the key and the value.
    """
    for key, domain in search_space.items():
        for value in _probe_values(domain):
            if isinstance(value, float) and not math.isfinite(value):
                raise _key_error(key, f"value {value!r} is not finite")
            try:
                apply_sample(base, {key: value})
            except ConfigError as exc:
                raise _key_error(key, f"value {value!r} is not a valid setting:\n{exc}") from None
