"""HPO search spaces: YAML round trip, one-line errors per bad key, real Optuna suggestions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from expflow_flows.errors import ExpflowError
from expflow_flows.hpo.space import (
    CategoricalParam,
    Fixed,
    FloatParam,
    IntParam,
    SearchSpace,
)

SPACE_YAML = """\
lr: {type: float, low: 1e-5, high: 0.1, log: true}
dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}
layers: {type: int, low: 1, high: 6}
width: {type: int, low: 32, high: 256, step: 32}
batch: {type: int, low: 8, high: 512, log: true}
act: {type: categorical, choices: [relu, tanh, gelu]}
epochs: 20
dataset: burgers
use_amp: true
seed: null
"""


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE_YAML)
    return path


def test_from_yaml_types_and_order(space_file: Path) -> None:
    space = SearchSpace.from_yaml(space_file)
    assert space.names == (
        "lr",
        "dropout",
        "layers",
        "width",
        "batch",
        "act",
        "epochs",
        "dataset",
        "use_amp",
        "seed",
    )
    assert space.params[0] == FloatParam("lr", 1e-5, 0.1, log=True)
    assert space.params[1] == FloatParam("dropout", 0.0, 0.5, step=0.1)
    assert space.params[3] == IntParam("width", 32, 256, step=32)
    assert space.params[5] == CategoricalParam("act", ("relu", "tanh", "gelu"))
    assert space.params[6] == Fixed("epochs", 20)
    assert space.fixed == {"epochs": 20, "dataset": "burgers", "use_amp": True, "seed": None}
    assert [p.name for p in space.searched] == ["lr", "dropout", "layers", "width", "batch", "act"]


def test_yaml_round_trip(space_file: Path, tmp_path: Path) -> None:
    space = SearchSpace.from_yaml(space_file)
    written = tmp_path / "again.yaml"
    written.write_text(yaml.safe_dump(space.to_dict(), sort_keys=False))
    again = SearchSpace.from_yaml(written)
    assert again == space
    assert again.to_dict() == space.to_dict()
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert space.to_dict()["lr"] == {"type": "float", "low": 1e-5, "high": 0.1, "log": True}
    assert space.to_dict()["layers"] == {"type": "int", "low": 1, "high": 6}
    assert space.to_dict()["epochs"] == 20


def test_load_accepts_path_str_dict_and_space(space_file: Path) -> None:
    space = SearchSpace.load(space_file)
    assert SearchSpace.load(str(space_file)) == space
    assert SearchSpace.load(space.to_dict()) == space
    assert SearchSpace.load(space) is space
    with pytest.raises(ExpflowError, match="expected a YAML path or a mapping"):
        SearchSpace.load(42)  # type: ignore[arg-type]


def test_numeric_text_from_yaml_is_accepted() -> None:
    space = SearchSpace.from_dict({"lr": {"type": "float", "low": "1e-5", "high": "1e-1"}})
    assert space.params[0] == FloatParam("lr", 1e-5, 0.1)
    ints = SearchSpace.from_dict({"n": {"type": "int", "low": 2.0, "high": "8"}})
    assert ints.params[0] == IntParam("n", 2, 8)


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        (
            "lr",
            {"type": "flaot", "low": 0, "high": 1},
            "search space key 'lr': unknown type 'flaot'; expected one of float, int, categorical",
        ),
        (
            "lr",
            {"type": "float", "high": 1},
            "search space key 'lr': type float needs low and high; missing low",
        ),
        (
            "n",
            {"type": "int"},
            "search space key 'n': type int needs low and high; missing low and high",
        ),
        (
            "lr",
            {"type": "float", "low": 1, "high": 0.5},
            "search space key 'lr': low 1.0 is greater than high 0.5",
        ),
        (
            "lr",
            {"type": "float", "low": 0, "high": 1, "log": True},
            "search space key 'lr': log scale needs low > 0, got low 0.0",
        ),
        (
            "n",
            {"type": "int", "low": 0, "high": 9, "log": True},
            "search space key 'n': log scale needs low > 0, got low 0",
        ),
        (
            "lr",
            {"type": "float", "low": 1e-4, "high": 1, "log": True, "step": 0.1},
            "search space key 'lr': log and step cannot be used together; drop one of them",
        ),
        (
            "n",
            {"type": "int", "low": 1.5, "high": 4},
            "search space key 'n': low 1.5 is not an integer",
        ),
        (
            "n",
            {"type": "int", "low": 1, "high": "many"},
            "search space key 'n': high 'many' is not an integer",
        ),
        (
            "lr",
            {"type": "float", "low": True, "high": 1},
            "search space key 'lr': low True is not a number",
        ),
        (
            "lr",
            {"type": "float", "low": 0, "high": float("inf")},
            "search space key 'lr': high inf is not a finite number",
        ),
        (
            "lr",
            {"type": "float", "low": 0, "high": 1, "step": 0},
            "search space key 'lr': step 0.0 must be greater than 0",
        ),
        (
            "lr",
            {"type": "float", "low": 0, "high": 1, "log": "yes"},
            "search space key 'lr': log 'yes' must be true or false",
        ),
        (
            "act",
            {"type": "categorical", "choices": []},
            "search space key 'act': choices is empty; give at least one choice",
        ),
        (
            "act",
            {"type": "categorical"},
            "search space key 'act': type categorical needs choices (a list)",
        ),
        (
            "act",
            {"type": "categorical", "choices": "relu"},
            "search space key 'act': choices 'relu' must be a list",
        ),
        (
            "act",
            {"type": "categorical", "choices": ["a", "a"]},
            "search space key 'act': choice 'a' is listed twice",
        ),
        (
            "act",
            {"type": "categorical", "choices": [[1, 2]]},
            "search space key 'act': choice [1, 2] is a list",
        ),
        (
            "lr",
            {"type": "float", "low": 0, "high": 1, "choices": [1]},
            "search space key 'lr': unknown key 'choices' for type float; accepted: type, low, high, log, step",
        ),
        (
            "act",
            {"type": "categorical", "choices": ["a"], "low": 1},
            "search space key 'act': unknown key 'low' for type categorical; accepted: type, choices",
        ),
        (
            "lr",
            {"low": 0, "high": 1},
            "search space key 'lr': mapping has no type; expected type one of float, int, categorical",
        ),
        ("act", ["relu", "tanh"], "search space key 'act': a list ['relu', 'tanh'] is ambiguous"),
    ],
)
def test_bad_param_messages(key: str, spec: object, message: str) -> None:
    with pytest.raises(ExpflowError) as info:
        SearchSpace.from_dict({"ok": 1, key: spec})
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_equal_bounds_are_allowed_as_optuna_allows_them() -> None:
    assert SearchSpace.from_dict({"x": {"type": "float", "low": 1, "high": 1}}).params[0].low == 1.0


def test_empty_space_and_non_mapping() -> None:
    with pytest.raises(
        ExpflowError, match="search space is empty; expected at least one parameter"
    ):
        SearchSpace.from_dict({})
    with pytest.raises(ExpflowError, match="must be a mapping of parameter names, got list"):
        SearchSpace.from_dict([1, 2])  # type: ignore[arg-type]


def test_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ExpflowError, match=r"search space file '.*nope.yaml' does not exist"):
        SearchSpace.from_yaml(missing)
    with pytest.raises(ExpflowError, match="is a folder, not a file"):
        SearchSpace.from_yaml(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: {type: float, low: 0\nwidth: [1, 2\n")
    with pytest.raises(ExpflowError, match=r"broken.yaml' is not valid YAML at line \d+"):
        SearchSpace.from_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr\n- width\n")
    with pytest.raises(
        ExpflowError, match="mapping of parameter names at the top level, not a list"
    ):
        SearchSpace.from_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ExpflowError, match="empty.yaml' is empty"):
        SearchSpace.from_yaml(empty)


def test_suggest_with_a_real_optuna_study(space_file: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_yaml(space_file)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        params = space.suggest(trial)
        assert list(params) == list(space.names)
        assert 1e-5 <= params["lr"] <= 0.1
        assert 0.0 <= params["dropout"] <= 0.5
        assert abs(params["dropout"] * 10 - round(params["dropout"] * 10)) < 1e-9
        assert 1 <= params["layers"] <= 6 and isinstance(params["layers"], int)
        assert params["width"] in range(32, 257, 32)
        assert 8 <= params["batch"] <= 512
        assert params["act"] in ("relu", "tanh", "gelu")
        assert {k: params[k] for k in space.fixed} == space.fixed
        study.tell(trial, params["lr"])
    assert len(study.trials) == 40
    # Suggested names are exactly the searched ones; fixed values stay out of Optuna.
    assert set(study.trials[0].params) == {p.name for p in space.searched}


def test_distributions_with_ask_and_complete(space_file: Path) -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_yaml(space_file)
    dists = space.to_optuna_distributions()
    assert list(dists) == ["lr", "dropout", "layers", "width", "batch", "act"]
    assert dists["lr"] == FloatDistribution(1e-5, 0.1, log=True)
    assert dists["width"] == IntDistribution(32, 256, step=32)
    assert dists["act"] == CategoricalDistribution(("relu", "tanh", "gelu"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask(fixed_distributions=dists)
    full = space.complete(trial.params)
    assert list(full) == list(space.names)
    assert full["epochs"] == 20 and 1 <= full["layers"] <= 6
    with pytest.raises(ExpflowError, match="lack searched parameter"):
        space.complete({"lr": 0.01})


def test_importing_space_does_not_import_optuna() -> None:
    code = (
        "import sys, expflow_flows.hpo.space; print('optuna' in sys.modules, 'yaml' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "False"]
