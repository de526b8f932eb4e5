"""How a script or command trainable is started: its command line, environment, working
directory, the budget as its own parameters, and the upstream run's files it needs.

A :class:`Launch` is plain data (what ``TrainableSettings.launch()`` returns), so it
travels to Dask workers and Slurm jobs unchanged. Research code is run as it is:

* ``command`` is any command line, with ``{args}`` (the parameters, spliced in as
  separate arguments; appended when absent), ``{run_dir}`` and ``{upstream}``;
* ``interpreter`` runs a script target under another program (a venv's python,
  ``conda run -n pde python``, ``torchrun``, ``srun``) instead of expflow's Python;
* ``args`` come first (Hydra's ``+args=config_Adv.yaml`` group choice);
* ``cwd`` is the run folder unless asked otherwise, so parallel runs that write
  ``checkpoint.pt`` into their working directory never collide;
* ``from_upstream`` puts the upstream run's files (a checkpoint) into the run folder.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expflow_flows.errors import ExpflowError

# What expflow writes into every run folder: never replaced by an upstream file (a linked
# metrics.json would let this run's writes land in the upstream's folder).
OWN_FILES = frozenset(
    {
        "params.json",
        "metrics.json",
        "metadata.json",
        "status",
        "output.log",
        "intermediate.json",
        "llm_calls.jsonl",
    }
)
PLACEHOLDERS = ("{args}", "{run_dir}", "{upstream}")


@dataclass(frozen=True)
class Launch:
    """How to start a script or command (see the module's docstring)."""

    command: tuple[str, ...] = ()
    interpreter: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "run"
    budget_params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    from_upstream: tuple[str, ...] = ()
    upstream_mode: str = "link"

    @classmethod
    def from_value(cls, value: Launch | dict[str, Any] | None) -> Launch:
        """From plain data (a settings dump); None is the default launch."""
        if value is None:
            return cls()
        if isinstance(value, Launch):
            return value
        data = dict(value)
        for key in ("command", "interpreter", "args", "from_upstream"):
            words = data.get(key)
            if isinstance(words, str):
                words = shlex.split(words)
            if key in ("command", "interpreter"):
                # $VENV/bin/python, ${HOME}/…: expanded where the run starts.
                words = [os.path.expanduser(os.path.expandvars(w)) for w in words or ()]
            data[key] = tuple(words or ())
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ExpflowError(f"launch setting {unknown[0]!r} is not known")
        data["env"] = dict(data.get("env") or {})
        data["budget_params"] = dict(data.get("budget_params") or {})
        data["metrics"] = dict(data.get("metrics") or {})
        data = {k: v for k, v in data.items() if v is not None}
        return cls(**data)

    def with_budget(self, params: dict[str, Any], budget: dict[str, Any]) -> dict[str, Any]:
        """``params`` plus the budget under the code's own parameter names."""
        extra = {self.budget_params[k]: v for k, v in budget.items() if k in self.budget_params}
        return {**params, **extra}

    def working_dir(self, run_dir: Path) -> Path | None:
        """Where the process starts (None: where expflow runs)."""
        if self.cwd == "run":
            return run_dir
        if self.cwd == "launch":
            return None
        path = Path(os.path.expandvars(self.cwd)).expanduser()
        if not path.is_dir():
            raise ExpflowError(f"working directory {self.cwd!r} is not a folder")
        return path

    def command_line(
        self,
        script: Path | None,
        param_args: Sequence[str],
        run_dir: Path,
        upstream: Path | str | None,
    ) -> list[str]:
        """The command that runs: the ``command`` template, or the script under its interpreter."""
        fixed = list(self.args)
        if self.command:
            template = list(self.command)
            out: list[str] = []
            spliced = False
            for token in template:
                if token == "{args}":
                    out += [*fixed, *param_args]
                    spliced = True
                    continue
                token = token.replace("{run_dir}", str(run_dir))
                token = token.replace("{upstream}", str(upstream or ""))
                out.append(token)
            if not spliced:
                out += [*fixed, *param_args]
            return out
        assert script is not None
        if self.interpreter:
            return [*self.interpreter, str(script), *fixed, *param_args]
        if script.suffix == ".py":
            return [sys.executable, str(script), *fixed, *param_args]
        return [str(script.resolve()), *fixed, *param_args]

    def check_command(self) -> None:
        """The program a command or interpreter names must exist (one line when it does not)."""
        words = self.command or self.interpreter
        if not words:
            return
        program = words[0]
        if any(p in program for p in PLACEHOLDERS):
            return
        if "/" in program:
            if not os.access(os.path.expanduser(program), os.X_OK):
                raise ExpflowError(f"program {program!r} does not exist or is not executable")
        elif shutil.which(program) is None:
            raise ExpflowError(f"program {program!r} is not on PATH")

    def bring_upstream(self, upstream: Path | str | None, run_dir: Path) -> list[str]:
        """Link (or copy) the upstream run's files matching ``from_upstream`` into ``run_dir``.

        Returns the relative paths put in; a pattern that matches nothing is an error, since
        the run would look for a file that is not there.
        """
        if not self.from_upstream:
            return []
        if not upstream:
            raise ExpflowError(
                "from_upstream is set but this run has no upstream run (it applies to "
                "evaluate, and to the steps after the first in a chain)"
            )
        source = Path(upstream)
        placed: list[str] = []
        for entry in self.from_upstream:
            # 'pattern' keeps each file's path; 'pattern -> folder' puts the files by name
            # into that folder of the run ('outputs/*/model.ckpt -> .').
            pattern, arrow, into = (part.strip() for part in entry.partition("->"))
            matches = sorted(glob.glob(pattern, root_dir=source, recursive=True))
            files = [m for m in matches if (source / m).is_file() or (source / m).is_dir()]
            if not files:
                raise ExpflowError(
                    f"from_upstream {pattern!r} matches nothing in the upstream run {source}"
                )
            for rel in files:
                if Path(rel).parts[0] in OWN_FILES:
                    continue
                if any(rel.startswith(p + os.sep) for p in placed):
                    continue  # inside a folder already put in
                name = str(Path(into or ".") / Path(rel).name) if arrow else rel
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ExpflowError(
                        f"from_upstream {entry!r}: the folder must be inside the run"
                    )
                target = run_dir / name
                if target.exists() or target.is_symlink():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = (source / rel).resolve()
                if self.upstream_mode == "copy":
                    if src.is_dir():
                        shutil.copytree(src, target)
                    else:
                        shutil.copy2(src, target)
                else:
                    target.symlink_to(src, target_is_directory=src.is_dir())
                placed.append(name)
        return placed
