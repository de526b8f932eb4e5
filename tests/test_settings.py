"""The typed settings models: one place, every input validated alike, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expflow_flows.errors import ExpflowError
from expflow_flows.settings.base import overrides_model, set_dotted
from expflow_flows.settings.pipeline import PipelineSettings, load_pipeline_settings
from expflow_flows.settings.sweep import SweepSettings, load_sweep_settings

# (dotted field, value) for every leaf a user sets often; each is set from YAML and from
# dotted overrides (what `--set` builds), and read back from the resolved settings.
PIPELINE_FIELDS = [
    ("experiment", "exp-1"),
    ("train.target", "pkg.mod:fn"),
    ("train.arg_style", "hydra"),
    ("train.budget.epochs", 7),
    ("train.timeout", 30.0),
    ("evaluate.target", "pkg.mod:ev"),
    ("evaluate.arg_style", "equals"),
    ("space", {"lr": {"type": "float", "low": 0.1, "high": 1.0}}),
    ("params", {"problem": "burgers"}),
    ("objective", "val_loss"),
    ("direction", "maximize"),
    ("hpo.n_trials", 5),
    ("hpo.pruner.name", "none"),
    ("hpo.sampler.name", "cmaes"),
    ("hpo.seed", 3),
    ("hpo.storage", "/tmp/j.log"),
    ("hpo.study_name", "s1"),
    ("hpo.budget.seconds", 2.5),
    ("hpo.trial_timeout", 9.0),
    ("cluster.kind", "threads"),
    ("cluster.workers", 3),
    ("gates", ["nrmse:lt:0.1"]),
    ("submit.enabled", False),
    ("submit.to", "/tmp/sub"),
    ("submit.name", "b1"),
    ("submit.predictions", "out.h5"),
    ("offpeak.timezone", "Europe/Berlin"),
    ("tracking.clearml.project", "p"),
]


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    return obj


@pytest.mark.parametrize(("field", "value"), PIPELINE_FIELDS)
def test_every_pipeline_field_from_yaml_and_from_overrides(tmp_path: Path, field, value):
    data: dict = {}
    set_dotted(data, field, value)
    config = tmp_path / "p.yaml"
    config.write_text(json.dumps(data))  # JSON is YAML
    assert _get(load_pipeline_settings(config), field) == value
    assert _get(load_pipeline_settings(None, data), field) == value


def test_overrides_change_one_field_over_the_file(tmp_path: Path):
    config = tmp_path / "p.yaml"
    config.write_text("experiment: e\ntrain: pkg.mod:fn\nhpo: {n_trials: 4, pruner: none}\n")
    s = load_pipeline_settings(config, {"hpo": {"n_trials": 9}, "train": {"arg_style": "hydra"}})
    assert (s.experiment, s.hpo.n_trials, s.hpo.pruner.name) == ("e", 9, "none")
    assert (s.train.target, s.train.arg_style) == ("pkg.mod:fn", "hydra")


def test_a_partial_trainable_override_keeps_the_default_target():
    s = load_pipeline_settings(None, {"train": {"arg_style": "hydra"}})
    assert s.train.target == "expflow_flows.pde.trainables:train"
    assert s.train.arg_style == "hydra"
    assert s.train.budget.epochs == 40


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"hpo": {"n_trials": 0}}, "hpo.n_trials=0: input should be greater than or equal to 1"),
        ({"cluster": {"kind": "dask"}}, "cluster.kind='dask': input should be 'local'"),
        ({"runner": "dask"}, "'runner' is not known; it is now cluster.kind"),
        ({"hpo": {"bogus": 1}}, "'hpo.bogus' is not known; accepted: n_trials"),
        ({"gates": ["nrmse:xx:1"]}, "unknown op 'xx'"),
        ({"experiment": "a/b"}, "experiment='a/b': expected a name without '/'"),
        ({"offpeak": {"timezone": "Mars/X"}}, "timezone 'Mars/X' is not known"),
        ({"train": {"arg_style": "docopt"}}, "train.arg_style='docopt': input should be"),
        ({"cluster": {"kind": "threads", "address": "tcp://h:1"}}, "an address is given"),
        ({"tracking": {"wandb": {}}}, "'tracking.wandb' is not known; accepted: clearml"),
    ],
)
def test_bad_pipeline_settings_are_one_line_naming_field_and_value(overrides, expected):
    with pytest.raises(ExpflowError) as err:
        load_pipeline_settings(None, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_sweep_settings_one_vocabulary(tmp_path: Path):
    config = tmp_path / "s.yaml"
    config.write_text(
        "name: s\ntrainable: {target: m:f, arg_style: hydra, budget: {epochs: 2}}\n"
        "space: {grid: {x: [1, 2]}}\ncluster: {workers: 4}\ndirection: maximize\n"
    )
    s = load_sweep_settings(config, {"cluster": {"address": "tcp://h:1"}})
    assert (s.cluster.kind, s.cluster.workers, s.cluster.address) == ("local", 4, "tcp://h:1")
    assert s.maximize and s.chain()[0].arg_style == "hydra"
    with pytest.raises(ExpflowError, match="'maximize' is not known; it is now direction"):
        load_sweep_settings(config, {"maximize": True})
    with pytest.raises(ExpflowError, match="exactly one of trainable"):
        load_sweep_settings(None, {"space": {"grid": {"x": [1]}}})


def test_the_overrides_schema_is_typed_with_descriptions_and_choices():
    schema = overrides_model(PipelineSettings).model_json_schema()
    assert schema["additionalProperties"] is False
    cluster = schema["$defs"]["ClusterSettingsOverrides"]["properties"]
    kinds = next(a for a in cluster["kind"]["anyOf"] if "enum" in a)
    assert kinds["enum"] == ["local", "threads", "slurm"]
    assert cluster["workers"]["description"]
    assert (
        next(a for a in cluster["workers"]["anyOf"] if a.get("type") == "integer")["minimum"] == 1
    )
    for model in (PipelineSettings, SweepSettings):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_an_explicit_null_clears_what_the_config_file_set(tmp_path):
    """``--set hpo.seed=null`` (or null in a flow's settings) means "no value", for the
    settings that may be empty; the others keep their value."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "hpo: {seed: 5, storage: /tmp/x.log}\n"
        "offpeak: {windows: ['22:00-06:00']}\n"
        "submit: {name: fixed}\n"
    )
    changes: dict = {}
    for key in ("hpo.seed", "hpo.storage", "offpeak", "submit.name", "hpo.n_trials"):
        set_dotted(changes, key, None)
    settings = load_pipeline_settings(config, changes)
    assert settings.hpo.seed is None and settings.hpo.storage is None
    assert settings.offpeak is None and settings.submit.name is None
    assert settings.hpo.n_trials == 12  # may not be empty: a null is "not given"
    kept = load_pipeline_settings(config, {"hpo": {"n_trials": 3}})
    assert kept.hpo.seed == 5 and kept.offpeak is not None and kept.submit.name == "fixed"


@pytest.mark.parametrize(
    ("load", "changes", "line"),
    [
        (
            load_pipeline_settings,
            {"hpo": 3},
            "pipeline setting hpo=3: input should be a valid dictionary",
        ),
        (
            load_sweep_settings,
            {"trainable": "m:f", "space": {"grid": {"x": [1]}}, "resources": {"memory": "lots"}},
            "sweep setting resources.memory='lots': memory 'lots': expected bytes or a size "
            "such as '2GB' or '512MiB'",
        ),
    ],
)
def test_errors_name_the_field_not_internal_classes(load, changes, line):
    with pytest.raises(ExpflowError) as err:
        load(None, changes)
    assert str(err.value) == line
