"""What every settings model shares: strictness, one-line errors, overrides and merging.

A settings model is written once, as a pydantic model with a description on every
field. From it come:

- the *overrides* model (:func:`overrides_model`): the same fields, all optional,
  with the same types, choices, bounds and descriptions. Flows take it as their
  ``settings`` parameter, so the Prefect UI renders a typed form, Prefect refuses a bad
  value before a run exists, and a deployment run can change one field
  (``--param settings='{"hpo": {"n_trials": 20}}'``) over its YAML config file;
- the resolution every entry point uses (:func:`resolve`): built-in defaults <
  YAML file < overrides, validated by the full model, errors as one line.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from expflow_flows.errors import ExpflowError
from expflow_flows.yamlfile import read_mapping


class Settings(BaseModel):
    """Base of every settings model: unknown keys are refused, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    # Settings whose value may be given as a plain string, stored in this field
    # (``train: pkg.mod:fn`` means ``train: {target: pkg.mod:fn}``).
    shorthand: ClassVar[str | None] = None
    # Mapping-valued settings an override replaces whole instead of merging key by key
    # (a search space given over another is a new space, not a mix of both).
    replaced: ClassVar[frozenset[str]] = frozenset()
    # Settings of earlier releases and where they are now: named in the error.
    renamed: ClassVar[dict[str, str]] = {}
    # Fields that each say what to run (``target``, ``command``): given one, an override
    # or a file's section replaces the others instead of merging with them.
    identity: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if cls.shorthand and isinstance(data, str):
            return {cls.shorthand: data}
        return data

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON-able values (for metadata, artifacts, YAML)."""
        return self.model_dump(mode="json")


class Overrides(BaseModel):
    """Base of the generated overrides models: every field optional, ``None`` means "not given"."""

    model_config = ConfigDict(extra="forbid")
    source: ClassVar[type[Settings]]

    @model_validator(mode="before")
    @classmethod
    def _accept(cls, data: Any) -> Any:
        if isinstance(data, Settings):  # a full settings object given from Python
            return data.model_dump(exclude_unset=True)
        source = getattr(cls, "source", None)
        if source is not None and isinstance(data, dict):
            # A flow called with an earlier release's key (Python, a deployment run):
            # Prefect's refusal then says where the setting went.
            for key in data:
                if key in source.renamed and key not in cls.model_fields:
                    raise ValueError(f"{key!r} is not known; it is now {source.renamed[key]}")
        shorthand = getattr(cls, "source", None) and cls.source.shorthand
        if shorthand and isinstance(data, str):
            return {shorthand: data}
        return data

    def given(self) -> dict[str, Any]:
        """The fields that were given, nested, without the ``None`` of the ones that were not.

        An explicit null (``--set hpo.seed=null``) is given when the setting may be null:
        it clears what the config file set.
        """
        out: dict[str, Any] = {}
        source = type(self).source.model_fields
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                if name in self.model_fields_set and _accepts_none(source[name].annotation):
                    out[name] = None
                continue
            if isinstance(value, Overrides):
                value = value.given()
            elif isinstance(value, BaseModel):
                value = value.model_dump(exclude_unset=True)
            elif isinstance(value, list):
                value = [
                    v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v
                    for v in value
                ]
            out[name] = value
        return out


def _accepts_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


def _partial_annotation(annotation: Any) -> Any:
    """``Model`` → its overrides model; ``Model | None`` likewise; anything else unchanged."""
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return overrides_model(annotation)
    if get_origin(annotation) in (Union, type(int | None)):
        return Union[tuple(_partial_annotation(a) for a in get_args(annotation))]  # noqa: UP007
    return annotation


@functools.cache
def overrides_model(model: type[Settings]) -> type[Overrides]:
    """The overrides model of ``model``: same fields, choices, bounds and descriptions, all optional."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = _partial_annotation(info.annotation)
        if info.metadata:
            annotation = Annotated[annotation, *info.metadata]
        fields[name] = (
            annotation | None,
            Field(default=None, description=info.description, title=info.title),
        )
    partial = create_model(  # type: ignore[call-overload]
        f"{model.__name__}Overrides",
        __base__=Overrides,
        __doc__=model.__doc__,
        **fields,
    )
    partial.source = model
    return partial


def error_line(exc: ValidationError, what: str) -> str:
    """A pydantic error as one line: the field, the bad value, what is accepted."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(_loc_part(p) for p in err["loc"] if not _is_branch(p))
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = loc.rpartition(".")[0]
        return f"{what} setting {loc!r} is not known{_accepted_hint(exc, parent)}"
    if kind == "missing":
        return f"{what} setting {loc!r} is missing"
    message = str(err["msg"]).removeprefix("Value error, ")
    message = re.sub(r" or instance of \w+", "", message)
    message = message[:1].lower() + message[1:]
    if not loc:
        return f"{what} settings: {message}"
    if isinstance(value, dict):
        return f"{what} setting {loc}: {message}"
    return f"{what} setting {loc}={_short(value)}: {message}"


def _loc_part(part: Any) -> str:
    """A location part as written in a dotted key; a mapping key that could not be one
    (spaces, dots, control characters) is quoted, so the error stays one line."""
    text = str(part)
    if isinstance(part, int) or re.fullmatch(r"[\w-]+", text, re.ASCII):
        return text
    return repr(text)


def _is_branch(part: Any) -> bool:
    """Pydantic names union branches in a location (``str``, ``function-before[...]``)."""
    text = str(part)
    return (
        text in ("str", "int", "float", "bool", "list", "dict", "none")
        or "[" in text
        or text.endswith("Overrides")
        or text.endswith("Settings")
    )


def _accepted_hint(exc: ValidationError, parent: str) -> str:
    model = getattr(exc, "_expflow_model", None)
    if model is None:
        return ""
    for part in [p for p in parent.split(".") if p and not p.isdigit()]:
        info = model.model_fields.get(part)
        target = _model_in(info.annotation) if info else None
        if target is None:
            return ""
        model = target
    return "; accepted: " + ", ".join(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(model: type[BaseModel], data: Any, what: str) -> Any:
    """``model.model_validate(data)`` with a one-line ExpflowError for bad input."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        exc._expflow_model = model  # type: ignore[attr-defined]
        raise ExpflowError(error_line(exc, what)) from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "hpo.n_trials", 20)`` → ``d["hpo"]["n_trials"] = 20``."""
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise ExpflowError(
            f"setting name {key!r}: expected names joined by dots, e.g. hpo.n_trials"
        )
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else {"target": child}
            node[part] = child
        node = child
    node[parts[-1]] = value


def relative_to(base: Path, value: Any) -> Any:
    """A relative file path in a config file is relative to that file, when it exists there."""
    if not isinstance(value, str) or (":" in value and not value.endswith(".py")):
        return value
    if "/" not in value and not value.endswith((".py", ".yaml", ".yml", ".hdf5", ".h5")):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    candidate = (base / p).resolve()
    return str(candidate) if candidate.exists() else value


def relative_function(base: Path, spec: str) -> str:
    """``file.py:function`` with a file relative to the config file, made absolute."""
    path, sep, attr = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return f"{relative_to(base, path)}:{attr}"
    return spec


def relative_trainable(base: Path, section: dict[str, Any]) -> None:
    """A trainable section's file names (target, command and interpreter words, reader)
    made relative to the config file where they exist there."""
    if isinstance(section.get("target"), str):
        section["target"] = relative_to(base, section["target"])
    for key in ("command", "interpreter"):
        words = section.get(key)
        if isinstance(words, str):
            words = shlex.split(words)
        if isinstance(words, list):
            section[key] = [relative_to(base, w) if isinstance(w, str) else w for w in words]
    metrics = section.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("reader"), str):
        metrics["reader"] = relative_function(base, metrics["reader"])


# What an empty config file is told a minimal one holds (an empty file is a mistake:
# it would silently run the built-in defaults).
MINIMAL_CONFIG = {
    "pipeline": "a minimal one holds e.g. 'experiment: my-study' and 'train: pkg.module:train' "
    "(or run without --config for the built-in PDE workload)",
    "sweep": "a minimal one holds e.g. 'trainable: train.py' and 'space: space.yaml'",
}


def read_settings_file(path: str | Path, what: str) -> tuple[dict[str, Any], Path]:
    """A YAML settings file as a mapping, and its folder; an empty file is an error."""
    p = Path(path).expanduser()
    hint = MINIMAL_CONFIG.get(what, "give at least one setting")
    data = read_mapping(p, f"{what} config", hint, mapping="a mapping of settings")
    return data, p.parent


def resolve(
    model: type[Settings],
    what: str,
    file_data: dict[str, Any],
    overrides: Any,
    renamed: dict[str, str] | None = None,
) -> Any:
    """Built-in defaults < file < overrides, validated by ``model`` (one-line errors)."""
    renamed = renamed or {}
    for key in file_data:
        if key in renamed and key not in model.model_fields:
            raise ExpflowError(f"{what} setting {key!r} is not known; it is now {renamed[key]}")
    given: dict[str, Any] = {}
    if overrides is not None:
        if isinstance(overrides, dict):
            for key in overrides:
                if key in renamed and key not in model.model_fields:
                    raise ExpflowError(
                        f"{what} setting {key!r} is not known; it is now {renamed[key]}"
                    )
        partial = validate(overrides_model(model), overrides, what)
        given = partial.given()
    base = dict(file_data)
    for key, value in file_data.items():
        # A file's trainable without its target changes the default trainable's settings.
        default = (
            model.model_fields[key].get_default(call_default_factory=True)
            if key in model.model_fields
            else None
        )
        if isinstance(value, dict) and isinstance(default, Settings) and default.identity:
            if not any(name in value for name in default.identity):
                base[key] = deep_merge(default.model_dump(), value)
    for key, value in given.items():
        # An override of part of a section the file does not have changes the built-in
        # default of that section (``train: {arg_style: hydra}`` keeps the default target).
        if isinstance(value, dict) and key not in base:
            default = model.model_fields[key].get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                base[key] = default.model_dump()
        # A new command over a file's target (or the other way round) replaces it.
        section = base.get(key)
        identity = getattr(_model_in(model.model_fields[key].annotation), "identity", ())
        if isinstance(value, dict) and isinstance(section, dict) and identity:
            if any(value.get(name) is not None for name in identity):
                base[key] = {k: v for k, v in section.items() if k not in identity}
    merged = deep_merge(base, {k: v for k, v in given.items() if k not in model.replaced})
    merged.update({k: v for k, v in given.items() if k in model.replaced})
    return validate(model, merged, what)
