"""Hostile or tampered reproducibility packages: nothing tampered runs, nothing oversized lands.

Every archive here is a real tar built with ``tarfile``; sizes are kept small and the
limits are passed as keywords (or patched into the module) so that no test writes much.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from expflow_flows.bundles import package as pkg
from expflow_flows.bundles.package import (
    RunSpec,
    create_package,
    reproduce,
    unpack_package,
    verify_package,
)
from expflow_flows.cli.app import app
from expflow_flows.errors import ExpflowError
from expflow_flows.runs.trainable import run_trainable

runner = CliRunner()

SCRIPT = """\
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--x", type=float)
a = p.parse_args()
with open(os.environ["EXPFLOW_METRICS_FILE"], "w") as fh:
    json.dump({"loss": (a.x - 1.0) ** 2}, fh)
"""


@pytest.fixture(autouse=True)
def _no_team_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own key must not change what these tests see.
    monkeypatch.delenv("EXPFLOW_PACKAGE_KEY", raising=False)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small intact package of two runs of a script that is then deleted, so a re-run
    can only use the packaged copy in ``code/``."""
    script = tmp_path / "src" / "train.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    runs = []
    for i, x in enumerate((0.5, 2.0)):
        res = run_trainable(str(script), {"x": x}, tmp_path / "orig" / f"r{i}")
        assert res.ok, res.reason
        runs.append(RunSpec(f"r{i}", {"x": x}, res.metrics, str(script)))
    out = create_package(tmp_path / "pkgs", name="demo", trainable=str(script), runs=runs)
    script.unlink()
    return out


def read_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


def write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def replaced(src: Path, dst: Path, changes: dict[str, bytes]) -> Path:
    """A copy of the archive ``src`` with the members named (below the top folder) replaced."""
    members = []
    for info, data in read_members(src):
        rel = info.name.partition("/")[2]
        members.append((info, changes.get(rel, data)))
    return write_members(dst, members)


def evil_script(marker: Path, size: int | None = None) -> bytes:
    """A trainable that leaves ``marker`` behind (outside any work folder) when it runs;
    padded with a comment to exactly ``size`` bytes when given."""
    code = f"open({str(marker)!r}, 'w').write('ran')\n" + SCRIPT
    raw = code.encode()
    if size is not None:
        assert len(raw) + 2 <= size, "the packaged script is too short to pad"
        raw += b"#" + b"x" * (size - len(raw) - 2) + b"\n"
    return raw


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def hostile(path: Path, manifest_files: dict, *members: tuple[str, bytes]) -> Path:
    """An archive ``pkg/`` whose manifest lists ``manifest_files`` and which holds ``members``."""
    entries = [(tarfile.TarInfo(f"pkg/{name}"), data) for name, data in members]
    manifest = json.dumps({"format": 1, "files": manifest_files}).encode()
    return write_members(path, [(tarfile.TarInfo("pkg/manifest.json"), manifest), *entries])


# --------------------------------------------------------------------------- 1. tampered code


def test_tampered_code_in_an_archive_is_not_run(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "tampered-code-ran"
    tampered = replaced(archive, tmp_path / "t.tar.gz", {"code/train.py": evil_script(marker)})
    work = tmp_path / "work"
    with pytest.raises(ExpflowError) as err:
        reproduce(tampered, workdir=work)
    message = str(err.value)
    assert "code/train.py" in message and "manifest says" in message, message
    assert "\n" not in message
    assert not marker.exists()
    # Nothing ran and nothing stays: no unpacked copy, no re-run folder.
    assert files_under(work) == []


def test_tampered_code_of_the_same_size_is_not_run(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "same-size-ran"
    original = dict((m.name, d) for m, d in read_members(archive))["demo/code/train.py"] or b""
    # Pad the original up so the evil script fits in exactly its size.
    padded = original + b"#" + b"p" * 300 + b"\n"
    big = replaced(archive, tmp_path / "big.tar.gz", {"code/train.py": padded})
    # Rebuild an intact package around the padded script: rewrite its manifest entry.
    members = read_members(big)
    manifest = json.loads(next(d for m, d in members if m.name == "demo/manifest.json") or b"")
    manifest["files"]["code/train.py"] = pkg.bytes_entry(padded)
    intact = replaced(
        big, tmp_path / "intact.tar.gz", {"manifest.json": json.dumps(manifest).encode()}
    )
    assert verify_package(intact).ok
    evil = evil_script(marker, len(padded))
    assert len(evil) == len(padded)
    tampered = replaced(intact, tmp_path / "t.tar.gz", {"code/train.py": evil})
    work = tmp_path / "w"
    with pytest.raises(ExpflowError) as err:
        reproduce(tampered, workdir=work)
    message = str(err.value)
    assert "failed verification" in message and "code/train.py: checksum mismatch" in message
    assert "--trust-modified" in message and "\n" not in message
    assert not marker.exists()
    assert files_under(work) == []


def test_tampered_folder_is_refused_unless_trusted(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "folder-code-ran"
    root = unpack_package(archive, tmp_path / "u")
    (root / "code" / "train.py").write_bytes(evil_script(marker))
    with pytest.raises(ExpflowError, match=r"code/train.py: size \d+ bytes, manifest says"):
        reproduce(root, workdir=tmp_path / "w1")
    assert not marker.exists()
    assert files_under(tmp_path / "w1") == []

    report = reproduce(root, workdir=tmp_path / "w2", trust_modified=True)
    assert marker.exists()  # trusted: it ran, and the report says what was overridden
    assert [r.status for r in report.runs] == ["matched", "matched"]
    assert len(report.trusted_modified) == 1
    assert report.trusted_modified[0].startswith("code/train.py: size")
    summary = report.summary()
    assert "modified package" in summary and "code/train.py" in summary
    # Explicitly trusted, every run matched: that is a success, loudly labelled.
    assert report.ok


def test_packaged_reproduce_script_refuses_a_tampered_folder(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "script-code-ran"
    root = unpack_package(archive, tmp_path / "u")
    (root / "code" / "train.py").write_bytes(evil_script(marker))

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "reproduce.py", "--workdir", str(tmp_path / "w"), *extra],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = run()
    assert refused.returncode == 2 and "failed verification" in refused.stderr, refused.stderr
    assert not marker.exists()
    trusted = run("--trust-modified")
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert "warning: running a MODIFIED package" in trusted.stderr and marker.exists()


def test_cli_reproduce_refuses_and_trust_modified_warns(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "cli-code-ran"
    root = unpack_package(archive, tmp_path / "u")
    (root / "code" / "train.py").write_bytes(evil_script(marker))
    refused = runner.invoke(app, ["package", "reproduce", str(root), "--workdir", str(tmp_path)])
    assert refused.exit_code == 2, refused.output
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: ") and "code/train.py" in line and "Traceback" not in line
    assert not marker.exists()

    trusted = runner.invoke(
        app,
        ["package", "reproduce", str(root), "--workdir", str(tmp_path / "w"), "--trust-modified"],
    )
    assert trusted.exit_code == 0, trusted.output
    assert "warning:" in trusted.stderr and "code/train.py" in trusted.stderr
    assert "2/2 runs matched" in trusted.stdout
    assert marker.exists()


def test_intact_package_still_reproduces(archive: Path, tmp_path: Path) -> None:
    report = reproduce(archive, workdir=tmp_path / "w")
    assert report.ok and report.trusted_modified == [], report.summary()
    assert "modified" not in report.summary()


# --------------------------------------------------------------------------- 2. unpack sizes


def test_member_bigger_than_its_manifest_entry_is_refused(tmp_path: Path) -> None:
    big = b"A" * 1_000_000
    archive = hostile(
        tmp_path / "liar.tar.gz",
        {"data/blob.bin": {"sha256": "0" * 64, "size": 10}},
        ("data/blob.bin", big),
    )
    dest = tmp_path / "dest"
    with pytest.raises(ExpflowError) as err:
        unpack_package(archive, dest)
    message = str(err.value)
    assert "'pkg/data/blob.bin'" in message and "1,000,000" in message and "10" in message
    assert files_under(dest) == []
    # reproduce leaves nothing in its work folder either.
    with pytest.raises(ExpflowError, match="manifest says 10 bytes"):
        reproduce(archive, workdir=tmp_path / "w")
    assert files_under(tmp_path / "w") == []


def test_member_not_in_the_manifest_is_refused(tmp_path: Path) -> None:
    archive = hostile(
        tmp_path / "extra.tar.gz",
        {"a.txt": pkg.bytes_entry(b"fine")},
        ("a.txt", b"fine"),
        ("code/sitecustomize.py", b"import os\n"),
    )
    with pytest.raises(ExpflowError, match=r"'pkg/code/sitecustomize.py'.*not listed in"):
        unpack_package(archive, tmp_path / "dest")
    assert files_under(tmp_path / "dest") == []


def test_member_listed_twice_in_the_archive_is_refused(tmp_path: Path) -> None:
    archive = hostile(
        tmp_path / "twice.tar.gz",
        {"a.txt": pkg.bytes_entry(b"fine")},
        ("a.txt", b"fine"),
        ("a.txt", b"evil"),
    )
    with pytest.raises(ExpflowError, match=r"'pkg/a.txt'.*appears twice"):
        unpack_package(archive, tmp_path / "dest")
    assert files_under(tmp_path / "dest") == []


def test_total_unpack_limit(tmp_path: Path) -> None:
    blobs = {f"data/{i}.bin": bytes([i]) * 3_000 for i in range(4)}
    archive = hostile(
        tmp_path / "many.tar.gz",
        {name: pkg.bytes_entry(data) for name, data in blobs.items()},
        *blobs.items(),
    )
    with pytest.raises(ExpflowError) as err:
        unpack_package(archive, tmp_path / "small", max_bytes=8_000)
    message = str(err.value)
    assert re.search(r"12,\d{3} bytes, over the 8,000-byte limit", message), message
    assert files_under(tmp_path / "small") == []
    # Within the limit, the same honest archive unpacks.
    root = unpack_package(archive, tmp_path / "roomy", max_bytes=20_000)
    assert (root / "data" / "3.bin").read_bytes() == blobs["data/3.bin"]
    with pytest.raises(ExpflowError, match="max_bytes"):
        unpack_package(archive, tmp_path / "bad", max_bytes=-1)


def test_unpack_into_an_existing_folder_leaves_it_empty(tmp_path: Path) -> None:
    archive = hostile(
        tmp_path / "liar.tar.gz",
        {"a.txt": pkg.bytes_entry(b"fine"), "b.bin": {"sha256": "0" * 64, "size": 1}},
        ("a.txt", b"fine"),
        ("b.bin", b"B" * 5_000),
    )
    dest = tmp_path / "existing"
    dest.mkdir()
    with pytest.raises(ExpflowError, match="'pkg/b.bin'"):
        unpack_package(archive, dest)
    assert dest.is_dir() and list(dest.iterdir()) == []


# --------------------------------------------------------------------------- 3. manifest size


def padded_manifest(archive: Path, dst: Path, pad: int) -> Path:
    """``archive`` with its manifest padded by ``pad`` spaces: still valid, just big."""
    members = read_members(archive)
    raw = next(d for m, d in members if m.name.endswith("/manifest.json")) or b""
    return replaced(archive, dst, {"manifest.json": raw + b" " * pad})


def test_oversized_manifest_is_a_verify_problem(archive: Path, tmp_path: Path) -> None:
    big = padded_manifest(archive, tmp_path / "big.tar.gz", 20_000)
    assert verify_package(big).ok  # padding alone is harmless under the default limit
    report = verify_package(big, max_manifest_bytes=10_000)
    assert not report.ok
    (problem,) = report.problems
    assert problem.startswith("manifest.json:") and "10,000" in problem, problem
    assert "bytes" in problem and "limit" in problem
    # The same on an unpacked folder.
    root = unpack_package(archive, tmp_path / "u")
    (root / "manifest.json").write_bytes((root / "manifest.json").read_bytes() + b" " * 20_000)
    (problem,) = verify_package(root, max_manifest_bytes=10_000).problems
    assert problem.startswith("manifest.json:") and "limit" in problem
    # Unpacking refuses it before reading, and reproduce runs nothing.
    with pytest.raises(ExpflowError, match=r"manifest.json.*10,000-byte limit"):
        unpack_package(big, tmp_path / "d", max_manifest_bytes=10_000)
    assert files_under(tmp_path / "d") == []


def test_oversized_runs_json_is_a_problem(archive: Path, tmp_path: Path) -> None:
    root = unpack_package(archive, tmp_path / "u")
    runs = root / "runs.json"
    runs.write_bytes(runs.read_bytes() + b" " * 30_000)
    problems = verify_package(root, max_manifest_bytes=10_000).problems
    assert any(p.startswith("runs.json:") and "limit" in p for p in problems), problems
    with pytest.raises(ExpflowError, match=r"runs.json.*limit"):
        reproduce(root, workdir=tmp_path / "w", trust_modified=True, max_manifest_bytes=10_000)


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"not json at all", "unreadable"),
        (b'{"files": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "unreadable"),
        (b'{"files": {"a": 1}, "oops": ', "unreadable"),
    ],
    ids=["garbage", "deeply-nested", "truncated"],
)
def test_unparsable_manifest_is_a_problem_not_a_traceback(
    tmp_path: Path, raw: bytes, why: str
) -> None:
    archive = write_members(tmp_path / "m.tar.gz", [(tarfile.TarInfo("pkg/manifest.json"), raw)])
    (problem,) = verify_package(archive).problems
    assert problem.startswith("manifest.json:") and why in problem, problem
    with pytest.raises(ExpflowError, match="manifest.json"):
        unpack_package(archive, tmp_path / "d")


def test_cli_verify_on_an_oversized_manifest(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = padded_manifest(archive, tmp_path / "big.tar.gz", 20_000)
    monkeypatch.setattr(pkg, "MAX_MANIFEST_BYTES", 10_000)
    result = runner.invoke(app, ["package", "verify", str(big)])
    assert result.exit_code == 1, result.output
    assert "manifest.json:" in result.stdout and "10,000" in result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --------------------------------------------------------------------------- 4. signatures


def test_signed_package(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    runs = [RunSpec("r0", {"x": 1.0}, {"loss": 0.0}, str(script))]
    signed = create_package(
        tmp_path / "signed.tar.gz", name="s", trainable=str(script), runs=runs, sign_key=b"team"
    )
    names = [m.name for m, _ in read_members(signed)]
    assert "s/manifest.sig" in names
    assert verify_package(signed, key=b"team").ok
    (problem,) = verify_package(signed, key=b"other").problems
    assert problem.startswith("manifest.sig:") and "does not match" in problem
    # Without a key configured a signature cannot be checked, and is not required.
    assert verify_package(signed).ok
    # A key configured (as the team's environment variable): unsigned packages are problems.
    monkeypatch.setenv("EXPFLOW_PACKAGE_KEY", "team")
    assert verify_package(signed).ok
    (problem,) = verify_package(archive).problems
    assert problem.startswith("manifest.sig: missing")
    with pytest.raises(ExpflowError, match="manifest.sig: missing"):
        reproduce(archive, workdir=tmp_path / "w")
    # A re-hashed manifest (a consistent forgery) fails the signature.
    members = read_members(signed)
    manifest = json.loads(next(d for m, d in members if m.name == "s/manifest.json") or b"")
    evil = b"print('evil')\n"
    manifest["files"]["code/s.py"] = pkg.bytes_entry(evil)
    forged = replaced(
        signed,
        tmp_path / "forged.tar.gz",
        {"manifest.json": json.dumps(manifest).encode(), "code/s.py": evil},
    )
    (problem,) = verify_package(forged).problems
    assert problem.startswith("manifest.sig:") and "does not match" in problem
    # The signature file itself never counts as an unexpected member.
    root = unpack_package(signed, tmp_path / "u")
    assert (root / "manifest.sig").is_file() and verify_package(root).ok


def test_cli_create_sign_key_env_names_a_missing_variable(home: Path) -> None:
    result = runner.invoke(
        app, ["package", "create", "--sweep", "nope", "--sign-key-env", "NO_SUCH_KEY_VAR"]
    )
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert "NO_SUCH_KEY_VAR" in line and "not set" in line
