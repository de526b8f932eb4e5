"""One secrets policy: a secret-looking parameter reaches the trainable unchanged and nothing
else. Secrets are planted through the pipeline's params and a sweep's fixed params, given to
a callable and to a script (on its command line); then every file under the expflow home,
every Prefect flow run's parameters, artifact and log, and the console are searched."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from sample_trainables import SECRET_KEY, SECRET_PASSWORD
from typer.testing import CliRunner

SECRETS = (SECRET_KEY, SECRET_PASSWORD)

# A script as research code writes it: the key arrives as --api_key on its command line.
EVALUATE = """
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--api_key")
p.add_argument("--db_password")
a, _ = p.parse_known_args()
ok = a.api_key == {key!r} and a.db_password == {pw!r}
json.dump({{"test_loss": 0.5 if ok else 99.0}}, open(os.environ["EXPFLOW_METRICS_FILE"], "w"))
open("pred.hdf5", "wb").write(b"predictions")
"""


def _leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


def _files_with_secrets(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and _leaks(path.read_bytes()):
            found.append(str(path.relative_to(root)))
    return found


async def _prefect_records() -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client

    out: list[tuple[str, str]] = []
    async with get_client() as client:
        for run in await client.read_flow_runs(limit=200):
            out.append((f"flow run {run.name} parameters", json.dumps(run.parameters, default=str)))
        for art in await client.read_artifacts(limit=200):
            out.append(
                (f"artifact {art.key}", json.dumps([art.data, art.description], default=str))
            )
        for log in await client.read_logs(limit=200):
            out.append(("log", log.message))
    return out


def test_secret_params_reach_the_trainable_and_nothing_else(prefect_harness, home, tmp_path, capfd):
    from expflow_flows.cli.app import app
    from expflow_flows.flows.pipeline import pipeline

    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE.format(key=SECRET_KEY, pw=SECRET_PASSWORD))
    secrets = {"api_key": SECRET_KEY, "db_password": SECRET_PASSWORD}
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(
        yaml.safe_dump(
            {
                "experiment": "secret-pipeline",
                "train": {"target": "sample_trainables:needs_secret"},
                "evaluate": {"target": str(script)},
                "space": {"x": {"type": "float", "low": 0.0, "high": 4.0}},
                "params": secrets,
                "objective": "loss",
                "hpo": {"n_trials": 3, "budget": {"epochs": 2}},
                "cluster": {"kind": "threads", "workers": 2},
                "gates": ["test_loss:lt:1"],
            }
        )
    )
    summary = pipeline(config=str(pipeline_yaml))
    # The trainable and the script got the real values: otherwise they fail or score 99.
    assert summary["trials"]["complete"] == 3, summary
    assert summary["metrics"]["test_loss"] == 0.5 and summary["gates"][0]["passed"]
    assert not _leaks(json.dumps(summary, default=str).encode())

    # The sweep gets its secrets on the command line (--set), the way a CI job passes them.
    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(
        yaml.safe_dump(
            {
                "name": "secret-sweep",
                "trainable": {"target": "sample_trainables:needs_secret"},
                "space": {"grid": {"x": [0.0]}},
                "objective": "loss",
                "cluster": {"kind": "threads", "workers": 2},
            }
        )
    )
    ran = CliRunner().invoke(
        app,
        [
            "sweep",
            "run",
            "--config",
            str(sweep_yaml),
            "--set",  # a space given here replaces the file's whole space
            f"space={{fixed: {{api_key: {SECRET_KEY}, db_password: {SECRET_PASSWORD}}}, "
            "grid: {x: [1.0, 2.0]}}",
        ],
    )
    assert ran.exit_code == 0, ran.output
    assert "ok 2" in ran.output and not _leaks(ran.output.encode())
    for args in (["--json"], []):  # for scripts, and the table a person reads
        cli = CliRunner().invoke(app, ["sweep", "results", "secret-sweep", "--best", "loss", *args])
        assert cli.exit_code == 0, cli.output
        assert ('"param:api_key": "***"' if args else "***") in cli.output, cli.output
        assert not _leaks(cli.output.encode())

    assert _files_with_secrets(home) == []
    leaked = [what for what, text in asyncio.run(_prefect_records()) if _leaks(text.encode())]
    assert leaked == []
    out, err = capfd.readouterr()
    assert not _leaks((out + err).encode())
