"""Reproducibility packages: create, verify, tamper, reproduce, safe unpacking, no secrets."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from expflow_flows.bundles.package import (
    RunSpec,
    create_package,
    reproduce,
    unpack_package,
    verify_package,
)
from expflow_flows.errors import ExpflowError
from expflow_flows.runs.trainable import run_trainable

SCRIPT = """\
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--x", type=float)
p.add_argument("--y", type=float)
p.add_argument("--api_key", default="")
a = p.parse_args()
print(f"connecting with api_key={a.api_key}")
metrics = {"loss": (a.x - 2.0) ** 2 + a.y / 3.0, "score": a.x * a.y + 0.1}
with open(os.environ["EXPFLOW_METRICS_FILE"], "w") as fh:
    json.dump(metrics, fh)
"""

# Distinctive values: a four-digit PIN or "abc" could turn up by chance in hashes and
# timestamps and make the byte search flaky.
PIN = "58213947"
SECRETS = {
    "config api_key": "sk-123-cfg-9Zq",
    "config password": "hunter2-cfg",
    "text pin": PIN,
    "text clearml": "clearml-s3cr3t-abc",
    "dotenv": "sk-dotenv-77xy",
    "dotenv url password": "dotenvpass42",
    "environment": "tok-env-0xDEADBEEF",
    "param api_key": "sk-param-5150",
    "text flow mapping": "tok-flow-31337",
}


@pytest.fixture(autouse=True)
def _no_team_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # With a developer's own package key set, every package here would also be signed.
    monkeypatch.delenv("EXPFLOW_PACKAGE_KEY", raising=False)


@pytest.fixture
def sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake sweep: a script trainable, five runs, a config folder with planted secrets."""
    monkeypatch.setenv("MY_SERVICE_API_TOKEN", SECRETS["environment"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = tmp_path / "src"
    src.mkdir()
    script = src / "train.py"
    script.write_text(SCRIPT)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "space.json").write_text(
        json.dumps(
            {
                "x": {"low": 0, "high": 4},
                "api_key": SECRETS["config api_key"],
                "password": SECRETS["config password"],
            }
        )
    )
    (cfg / "settings.txt").write_text(
        "LEARNING_RATE=0.1\n"
        f"EXPFLOW_PIN={SECRETS['text pin']}\n"
        f"CLEARML_API_SECRET_KEY={SECRETS['text clearml']}\n"
        f"env: {{SERVICE_TOKEN: {SECRETS['text flow mapping']}, LEVEL: 2}}\n"
    )
    (cfg / ".env").write_text(
        f"OPENAI_API_KEY={SECRETS['dotenv']}\n"
        f"DATABASE_URL=postgres://u:{SECRETS['dotenv url password']}@db/x\n"
    )
    sweep_dir = tmp_path / "sweep"
    runs = []
    for i, (x, y) in enumerate([(0.5, 1), (1.0, 2), (2.0, 3), (3.5, 4), (4.0, 5)]):
        params = {"x": x, "y": y, "api_key": SECRETS["param api_key"]}
        run_id = f"run-{i}"
        res = run_trainable(str(script), params, sweep_dir / run_id)
        assert res.ok, res.reason
        runs.append(RunSpec(run_id, params, res.metrics, str(script)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "small.csv").write_text("a,b\n1,2\n")
    (data / "big.bin").write_bytes(os.urandom(30_000))
    return {
        "script": script,
        "cfg": cfg,
        "sweep_dir": sweep_dir,
        "runs": runs,
        "data": data,
        "out": tmp_path / "out",
    }


def make(sweep: dict, **kw) -> Path:
    kw.setdefault("name", "demo")
    return create_package(
        sweep["out"],
        trainable=str(sweep["script"]),
        runs=sweep["runs"],
        config_files=[sweep["cfg"]],
        result_files=[sweep["sweep_dir"]],
        data_files=[sweep["data"] / "small.csv", sweep["data"] / "big.bin"],
        include_data_up_to_mb=0.01,
        extra={"study": "s1", "hf_token": "x"},
        **kw,
    )


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isreg()
        }


def rewrite(archive: Path, dst: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of ``archive`` with members replaced (bytes), removed (None) or added."""
    with tarfile.open(archive) as src, tarfile.open(dst, "w:gz") as out:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isreg() else None  # type: ignore[union-attr]
            if m.name in changes:
                data = changes[m.name]
                if data is None:
                    continue
                m.size = len(data)
            out.addfile(m, io.BytesIO(data) if data is not None else None)
        for name, data in changes.items():
            if data is not None and name not in src.getnames():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return dst


def test_layout_manifest_and_verify(sweep: dict) -> None:
    archive = make(sweep)
    assert archive == sweep["out"] / "demo.tar.gz"
    files = members(archive)
    names = sorted(n.removeprefix("demo/") for n in files)
    assert all(n.startswith("demo/") for n in files)
    for expected in (
        "manifest.json",
        "runs.json",
        "environment.json",
        "data.json",
        "reproduce.py",
        "README.md",
        "code/train.py",
        "config/cfg/space.json",
        "config/cfg/settings.txt",
        "results/sweep/run-0/metrics.json",
        "results/sweep/run-4/params.json",
        "data/small.csv",
    ):
        assert expected in names, expected
    assert "data/big.bin" not in names  # over the size limit: checksummed only
    manifest = json.loads(files["demo/manifest.json"])
    assert manifest["name"] == "demo" and manifest["kind"] == "sweep"
    assert manifest["trainables"] == [str(sweep["script"])]
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["extra"] == {"study": "s1", "hf_token": "***"}
    data = json.loads(files["demo/data.json"])
    by_name = {d["name"]: d for d in data["files"]}
    assert by_name["big.bin"]["included"] is None and by_name["big.bin"]["size"] == 30_000
    assert by_name["small.csv"]["included"] == "data/small.csv"
    env = json.loads(files["demo/environment.json"])
    assert env["python"] == sys.version.split()[0]
    assert "pytest" in env["packages"] and env["env"]["OMP_NUM_THREADS"] == "1"
    assert "MY_SERVICE_API_TOKEN" not in env["env"]
    runs = json.loads(files["demo/runs.json"])["runs"]
    assert [r["run_id"] for r in runs] == [f"run-{i}" for i in range(5)]
    assert runs[0]["params"]["api_key"] == "***" and runs[0]["redacted_params"] == ["api_key"]

    report = verify_package(archive)
    assert report.ok, report.problems
    assert report.environment_differences == []
    # An unpacked package verifies too.
    root = unpack_package(archive, sweep["out"] / "x")
    assert verify_package(root).ok

    with pytest.raises(ExpflowError, match="already exists"):
        make(sweep)


def test_verify_reports_tampering_missing_and_unexpected(sweep: dict, tmp_path: Path) -> None:
    archive = make(sweep)
    tampered = rewrite(
        archive,
        tmp_path / "t.tar.gz",
        {
            "demo/results/sweep/run-1/metrics.json": b'{"loss": 0.0, "score": 9.9}',
            "demo/config/cfg/settings.txt": None,
            "demo/notes.txt": b"added later",
        },
    )
    report = verify_package(tampered)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "results/sweep/run-1/metrics.json" in text
    assert "config/cfg/settings.txt: missing" in text
    assert "notes.txt: unexpected file" in text
    # Same check on an unpacked folder, with a changed byte of the same size.
    root = unpack_package(archive, tmp_path / "u")
    target = root / "code" / "train.py"
    raw = bytearray(target.read_bytes())
    raw[0] ^= 1
    target.write_bytes(bytes(raw))
    problems = verify_package(root).problems
    assert len(problems) == 1 and problems[0].startswith("code/train.py: checksum mismatch")
    # Environment differences are information, not failures.
    env_path = root / "environment.json"
    env = json.loads(env_path.read_text())
    env["python"] = "2.7.18"
    env["packages"]["pytest"] = "0.0.1"
    env_path.write_text(json.dumps(env))
    diffs = verify_package(root).environment_differences
    assert any(d.startswith("python: 2.7.18") for d in diffs)
    assert any(d.startswith("package pytest: 0.0.1") for d in diffs)


def test_reproduce_matches_differs_and_uses_packaged_copy(sweep: dict, tmp_path: Path) -> None:
    archive = make(sweep)
    report = reproduce(archive, combos=["run-1", "run-3"], workdir=tmp_path / "w1")
    assert report.ok, report.summary()
    assert [(r.run_id, r.status) for r in report.runs] == [
        ("run-1", "matched"),
        ("run-3", "matched"),
    ]
    assert report.runs[0].trainable == str(sweep["script"])  # the original still exists
    assert reproduce(archive, first=2, workdir=tmp_path / "w2").count("matched") == 2

    # The original script now gives other numbers: reproduce says which and by how much.
    sweep["script"].write_text(SCRIPT.replace("+ 0.1}", "+ 0.2}"))
    report = reproduce(archive, combos=["run-2"], workdir=tmp_path / "w3")
    assert not report.ok
    (run,) = report.runs
    assert run.status == "differed"
    (diff,) = run.differences
    assert diff.name == "score" and diff.expected == pytest.approx(6.1)
    assert diff.got == pytest.approx(6.2)
    assert "score expected 6.1" in report.summary()
    # A loose tolerance accepts it.
    assert reproduce(archive, combos=["run-2"], tolerance=0.05, workdir=tmp_path / "w4").ok

    # The original is gone: the packaged copy in code/ is run.
    sweep["script"].unlink()
    report = reproduce(archive, combos=["run-0"], workdir=tmp_path / "w5")
    assert report.ok, report.summary()
    assert "/code/train.py" in report.runs[0].trainable

    with pytest.raises(ExpflowError, match="'run-9' is not in the package"):
        reproduce(archive, combos=["run-9"], workdir=tmp_path / "w6")


def test_reproduce_script_in_the_package(sweep: dict, tmp_path: Path) -> None:
    root = unpack_package(make(sweep), tmp_path / "u")
    proc = subprocess.run(
        [sys.executable, "reproduce.py", "--combos", "run-4", "--workdir", str(tmp_path / "w")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 runs matched" in proc.stdout and "run-4: matched" in proc.stdout
    # Re-runs went to the workdir, so the package folder still verifies.
    assert verify_package(root).ok


def test_reproduce_reports_failed_runs(sweep: dict, tmp_path: Path) -> None:
    archive = make(sweep)
    sweep["script"].write_text("raise SystemExit('broken on purpose')\n")
    report = reproduce(archive, combos=["run-0"], workdir=tmp_path / "w")
    (run,) = report.runs
    assert run.status == "failed" and "broken on purpose" in run.reason


def _tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        manifest = tarfile.TarInfo("pkg/manifest.json")
        manifest.size = 12
        tar.addfile(manifest, io.BytesIO(b'{"files":{}}'))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"evil") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_unsafe_archives_are_refused(tmp_path: Path) -> None:
    outside = Path(tempfile.gettempdir()) / f"expflow-evil-{uuid.uuid4().hex}"
    device = tarfile.TarInfo("pkg/dev")
    device.type = tarfile.CHRTYPE
    cases = {
        "pkg/../../evil.txt": _file("pkg/../../evil.txt"),
        "../evil.txt": _file("../evil.txt"),
        str(outside): _file(str(outside)),
        "pkg/passwd": _link("pkg/passwd", "/etc/passwd", tarfile.SYMTYPE),
        "pkg/hard": _link("pkg/hard", "../../etc/passwd", tarfile.LNKTYPE),
        "pkg/dev": (device, None),
    }
    whys = {
        "pkg/../../evil.txt": "climbs out",
        "../evil.txt": "climbs out",
        str(outside): "absolute",
        "pkg/passwd": "symbolic link",
        "pkg/hard": "hard link",
        "pkg/dev": "device file",
    }
    for i, (member, entry) in enumerate(cases.items()):
        archive = _tar_with(tmp_path / f"bad{i}.tar.gz", entry)
        work = tmp_path / f"w{i}"
        with pytest.raises(ExpflowError) as err:
            reproduce(archive, workdir=work)
        message = str(err.value)
        assert repr(member) in message and whys[member] in message, message
        # Nothing written: not outside, and not even inside the workdir.
        assert [p for p in work.rglob("*") if not p.is_dir()] == []
    assert not outside.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    # A second top folder is refused as well.
    archive = _tar_with(tmp_path / "two.tar.gz", _file("other/x.txt"))
    with pytest.raises(ExpflowError, match="outside the top folder"):
        unpack_package(archive, tmp_path / "two")
    # verify_package reads without extracting and reports the same members.
    problems = verify_package(_tar_with(tmp_path / "v.tar.gz", cases["pkg/passwd"])).problems
    assert any("pkg/passwd" in p and "symbolic link" in p for p in problems)


def test_no_secret_is_packaged(sweep: dict, tmp_path: Path) -> None:
    archive = make(sweep)
    dest = tmp_path / "all"
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    names = [p.name for p in dest.rglob("*")]
    assert ".env" not in names
    blob = b"".join(p.read_bytes() for p in dest.rglob("*") if p.is_file())
    blob += archive.read_bytes()  # the compressed bytes and tar headers as well
    for what, value in SECRETS.items():
        assert value.encode() not in blob, f"{what} leaked"
    # Harmless values survive, and the exclusion is on record.
    root = dest / "demo"
    assert "LEARNING_RATE=0.1" in (root / "config/cfg/settings.txt").read_text()
    assert json.loads((root / "config/cfg/space.json").read_text())["x"] == {"low": 0, "high": 4}
    excluded = json.loads((root / "manifest.json").read_text())["excluded"]
    assert {"path": "config/cfg/.env", "reason": "secret file"} in excluded


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_snapshot_from_git(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    script = repo / "train.py"
    script.write_text(SCRIPT)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    git("init", "-q")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD").strip()
    script.write_text(SCRIPT + '# tuned\nAPI_TOKEN = "tok-git-s3cr3t"\n')
    res = run_trainable(str(script), {"x": 1.0, "y": 2.0}, tmp_path / "r")
    archive = create_package(
        tmp_path / "p.tar.gz",
        name="g",
        trainable=str(script),
        runs=[RunSpec("r1", {"x": 1.0, "y": 2.0}, res.metrics, str(script))],
        kind="experiment",
    )
    files = members(archive)
    assert files["g/code/commit.txt"].decode().strip() == commit
    patch = files["g/code/diff.patch"].decode()
    assert "+# tuned" in patch and "API_TOKEN" in patch
    assert b"tok-git-s3cr3t" not in b"".join(files.values())
    manifest = json.loads(files["g/manifest.json"])
    assert manifest["code"]["git"]["commit"] == commit and manifest["code"]["git"]["dirty"]
    assert manifest["kind"] == "experiment"
    assert verify_package(archive).ok


def test_callable_trainable_and_bad_input(tmp_path: Path) -> None:
    runs = [RunSpec("a", {"a": 2}, {"value": 4.0}, "sample_trainables:params_only")]
    archive = create_package(
        tmp_path, name="c", trainable="sample_trainables:params_only", runs=runs
    )
    names = members(archive)
    # Inside this git checkout the path is relative to the repository; else the module path.
    assert "c/code/tests/sample_trainables.py" in names or "c/code/sample_trainables.py" in names
    assert reproduce(archive, workdir=tmp_path / "w").ok
    with pytest.raises(ExpflowError, match="package name '../x'"):
        create_package(tmp_path, name="../x", trainable="sample_trainables:params_only", runs=[])
    with pytest.raises(ExpflowError, match="appears twice"):
        create_package(tmp_path, name="d", trainable=runs[0].trainable, runs=runs * 2)
    with pytest.raises(ExpflowError, match="metric 'value' is 'low'"):
        bad = [RunSpec("b", {}, {"value": "low"}, "sample_trainables:params_only")]  # type: ignore[dict-item]
        create_package(tmp_path, name="e", trainable=runs[0].trainable, runs=bad)
    with pytest.raises(ExpflowError, match="does not exist"):
        create_package(
            tmp_path, name="f", trainable=str(tmp_path / "nope.py"), runs=[], config_files=[]
        )
    with pytest.raises(ExpflowError, match="tolerance"):
        reproduce(archive, tolerance=-1)


def test_thousand_run_package_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Measured, not asserted: 1,000 runs, each with params, metrics and metadata files."""
    sweep_dir = tmp_path / "sweep"
    runs = []
    for i in range(1000):
        d = sweep_dir / f"run-{i:04d}"
        d.mkdir(parents=True)
        params = {"x": i / 1000, "y": i % 7, "lr": 1e-3}
        metrics = {"loss": (i / 1000 - 0.5) ** 2, "score": float(i % 13)}
        (d / "params.json").write_text(json.dumps(params))
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "metadata.json").write_text(json.dumps({"trainable": "t", "wall_s": 0.1}))
        runs.append(RunSpec(f"run-{i:04d}", params, metrics, "sample_trainables:params_only"))
    started = time.perf_counter()
    archive = create_package(
        tmp_path / "out",
        name="big",
        trainable="sample_trainables:params_only",
        runs=runs,
        result_files=[sweep_dir],
    )
    took = time.perf_counter() - started
    started = time.perf_counter()
    report = verify_package(archive)
    verify_took = time.perf_counter() - started
    assert report.ok
    with capsys.disabled():
        print(
            f"\n1,000-run package: created in {took:.2f} s, verified in {verify_took:.2f} s, "
            f"{archive.stat().st_size / 1e3:.0f} kB"
        )
