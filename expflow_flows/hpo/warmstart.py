"""Warm starts: configurations a study tries before its sampler asks for any.

They come from the settings (``hpo.warm_start.configs``), from the best trials of an
earlier study, or from the best rows of a sweep. Each is enqueued once (a resumed study
does not enqueue it again), marked with where it came from, and checked against the
search space first: a configuration the space cannot hold is one clear line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expflow_flows.errors import ExpflowError
from expflow_flows.hpo import study as hpo
from expflow_flows.hpo.space import CategoricalParam, IntParam, SearchSpace

if TYPE_CHECKING:
    import optuna

    from expflow_flows.settings.pipeline import WarmStartSettings

KEY_ATTR = "warm_start_key"  # the enqueued configuration, as canonical JSON


def configurations(
    warm: WarmStartSettings, space: SearchSpace, storage: str | None
) -> list[tuple[str, dict[str, Any]]]:
    """(source, parameters) of every warm start, in order: given, study, sweep."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i, config in enumerate(warm.configs, 1):
        out.append(("config", check_config(config, space, f"hpo.warm_start.configs[{i}]")))
    if warm.study is not None:
        src = warm.study
        for params in from_study(src.storage or storage, src.name, src.best, space):
            out.append((f"study:{src.name}", params))
    if warm.sweep is not None:
        src = warm.sweep
        for params in from_sweep(src.name, src.metric, src.maximize, src.best, space):
            out.append((f"sweep:{src.name}", params))
    return out


def check_config(config: dict[str, Any], space: SearchSpace, where: str) -> dict[str, Any]:
    """The configuration's searched parameters; one line for a key or value the space
    cannot hold."""
    params = {p.name: p for p in space.searched}
    if not isinstance(config, dict):
        raise ExpflowError(f"{where} {config!r} is not a mapping of parameters to values")
    for key, value in config.items():
        p = params.get(key)
        if p is None:
            raise ExpflowError(
                f"{where}: {key!r} is not a searched parameter of the search space "
                f"(searched: {', '.join(params) or 'none'})"
            )
        if isinstance(p, CategoricalParam):
            if value not in p.choices:
                raise ExpflowError(
                    f"{where}: {key}={value!r} is not one of its choices {list(p.choices)}"
                )
            continue
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if isinstance(p, IntParam) and (number is None or int(number) != number):
            raise ExpflowError(
                f"{where}: {key}={value!r} is not an integer from {p.low} to {p.high}"
            )
        if number is None or not math.isfinite(number) or not p.low <= number <= p.high:
            raise ExpflowError(
                f"{where}: {key}={value!r} is outside its range; expected a number from "
                f"{p.low} to {p.high}"
            )
    return dict(config)


def from_study(
    storage: str | None, name: str, best: int, space: SearchSpace
) -> list[dict[str, Any]]:
    """The parameters of the ``best`` trials of an earlier study (its Pareto front first
    when it has several objectives), restricted to this space's searched parameters."""
    import optuna

    try:
        other = optuna.load_study(study_name=name, storage=hpo.open_storage(storage))
    except KeyError:
        raise ExpflowError(
            f"hpo.warm_start.study: no study named {name!r} in {hpo.resolve_storage(storage)}"
        ) from None
    directions = [d.name.lower() for d in other.directions]
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    done = [
        t
        for t in other.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE" and t.values and hpo.is_feasible(t)
    ]
    front = {t.number for t in hpo.pareto_front(other)}
    ranked = sorted(
        done,
        key=lambda t: (
            t.number not in front,
            *[s * v for s, v in zip(signs, t.values, strict=True)],
        ),
    )
    return _in_space([dict(t.params) for t in ranked[:best]], space, f"study {name!r}")


def from_sweep(
    name: str, metric: str, maximize: bool, best: int, space: SearchSpace
) -> list[dict[str, Any]]:
    """The parameters of a sweep's ``best`` rows by ``metric`` (as `expflow sweep results
    NAME --best METRIC` lists them), restricted to this space's searched parameters."""
    from expflow_flows.home import runs_root
    from expflow_flows.sweep.results import SweepResults

    folder = runs_root() / name
    if _unsafe_name(name) or not (folder / "results.sqlite").exists():
        raise ExpflowError(f"hpo.warm_start.sweep: no sweep named {name!r} under {runs_root()}")
    from expflow_flows.sweep.results import PARAM_PREFIX

    rows = SweepResults.load(folder).best(metric, maximize=maximize, n=best)
    params = [
        {k[len(PARAM_PREFIX) :]: v for k, v in row.items() if k.startswith(PARAM_PREFIX)}
        for row in rows
    ]
    return _in_space(params, space, f"sweep {name!r}")


def _unsafe_name(name: str) -> bool:
    """A sweep name is one folder under the runs root, never a path."""
    return not name or Path(name).name != name or name in (".", "..")


def _in_space(rows: list[dict[str, Any]], space: SearchSpace, what: str) -> list[dict[str, Any]]:
    """Each row's values of this space's searched parameters that the space can hold."""
    out = []
    for row in rows:
        params = {}
        for p in space.searched:
            if p.name not in row:
                continue
            try:
                check_config({p.name: row[p.name]}, space, what)
            except ExpflowError:
                continue  # outside this study's space: the sampler picks it
            params[p.name] = row[p.name]
        if params:
            out.append(params)
    return out


def enqueue(
    study: optuna.Study,
    configs: list[tuple[str, dict[str, Any]]],
    log: Callable[[str], None] = lambda line: None,
) -> int:
    """Enqueue the warm starts the study has not had yet; returns how many."""
    seen = {t.user_attrs.get(KEY_ATTR) for t in study.get_trials(deepcopy=False)}
    queued = 0
    for source, params in configs:
        key = json.dumps([source, params], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        study.enqueue_trial(
            params, user_attrs={hpo.WARM_START_ATTR: source, KEY_ATTR: key}, skip_if_exists=False
        )
        queued += 1
    if queued:
        sources = sorted({s for s, _ in configs})
        log(f"{queued} warm-start configurations queued first ({', '.join(sources)})")
    return queued
