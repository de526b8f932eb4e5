"""Submission bundles: whole-or-nothing writes, no overwrite, checksums, scrubbed secrets."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from expflow_flows.bundles import submission
from expflow_flows.bundles.submission import verify_bundle, write_bundle
from expflow_flows.errors import ExpflowError
from expflow_flows.secrets import scrub


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    pred = src / "pred.hdf5"
    pred.write_bytes(b"\x89HDF" + bytes(range(256)) * 40)
    notes = src / "notes.txt"
    notes.write_text("seed 0\n")
    return {"pred.hdf5": pred, "extra/notes.txt": notes}


def write(dest: Path, name: str, files: dict[str, Path], **kw) -> Path:
    kw.setdefault("metrics", {"nrmse": 0.04})
    kw.setdefault("params", {"lr": 0.001})
    return write_bundle(dest, name, files, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_bundle_layout_and_manifest(tmp_path: Path, sources: dict[str, Path]) -> None:
    dest = tmp_path / "subs"
    path = write(
        dest,
        "pde-2026-11-22",
        sources,
        metrics={"nrmse": 0.04, "pde_mean": 17.2},
        params={"lr": 0.001, "width": 64},
        info={"study": "s1", "flow_run_id": "abc", "git_commit": "deadbeef"},
    )
    assert path == dest / "pde-2026-11-22"
    assert sorted(snapshot(path)) == [
        "extra/notes.txt",
        "manifest.json",
        "metrics.json",
        "params.json",
        "pred.hdf5",
    ]
    assert (path / "pred.hdf5").read_bytes() == sources["pred.hdf5"].read_bytes()
    assert json.loads((path / "metrics.json").read_text()) == {"nrmse": 0.04, "pde_mean": 17.2}
    assert json.loads((path / "params.json").read_text()) == {"lr": 0.001, "width": 64}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["bundle"] == "pde-2026-11-22"
    assert manifest["created"]
    assert manifest["info"] == {"study": "s1", "flow_run_id": "abc", "git_commit": "deadbeef"}
    assert sorted(manifest["files"]) == [
        "extra/notes.txt",
        "metrics.json",
        "params.json",
        "pred.hdf5",
    ]
    pred = (path / "pred.hdf5").read_bytes()
    assert manifest["files"]["pred.hdf5"] == {
        "sha256": hashlib.sha256(pred).hexdigest(),
        "size": len(pred),
    }
    assert verify_bundle(path) == []
    # No hidden temporary folder is left next to the bundle.
    assert [p.name for p in dest.iterdir()] == ["pde-2026-11-22"]


def test_refuses_overwrite_and_leaves_existing_untouched(tmp_path, sources) -> None:
    dest = tmp_path / "subs"
    path = write(dest, "b1", sources)
    before = snapshot(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"different")
    with pytest.raises(ExpflowError) as info:
        write(dest, "b1", {"pred.hdf5": other}, metrics={"nrmse": 9.9})
    assert str(path) in str(info.value) and "already exists" in str(info.value)
    assert snapshot(path) == before
    assert [p.name for p in dest.iterdir()] == ["b1"]


def test_refuses_an_existing_empty_folder_or_file(tmp_path, sources) -> None:
    dest = tmp_path / "subs"
    (dest / "empty").mkdir(parents=True)
    (dest / "afile").write_text("x")
    for name in ("empty", "afile"):
        with pytest.raises(ExpflowError, match="already exists"):
            write(dest, name, sources)
    assert sorted(p.name for p in dest.iterdir()) == ["afile", "empty"]
    assert list((dest / "empty").iterdir()) == []


def test_race_past_the_early_check_still_refused_atomically(tmp_path, sources, monkeypatch):
    # The name is claimed again at publish time, so an early check passing does not matter.
    dest = tmp_path / "subs"
    real_publish = submission._publish

    def publish_late(tmp: Path, final: Path) -> None:
        final.mkdir()
        (final / "theirs.txt").write_text("someone else's bundle")
        real_publish(tmp, final)

    monkeypatch.setattr(submission, "_publish", publish_late)
    with pytest.raises(ExpflowError, match="already exists"):
        write(dest, "late", sources)
    assert snapshot(dest / "late") == {"theirs.txt": b"someone else's bundle"}
    assert [p.name for p in dest.iterdir()] == ["late"]


def test_concurrent_writers_exactly_one_wins(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "subs"
    n = 8
    barrier = threading.Barrier(n)
    real_publish = submission._publish

    def publish_together(tmp: Path, final: Path) -> None:
        # Every writer has passed the early check and built its bundle before any claims the name.
        barrier.wait(timeout=10)
        real_publish(tmp, final)

    monkeypatch.setattr(submission, "_publish", publish_together)
    srcs = []
    for i in range(n):
        f = tmp_path / f"pred{i}.bin"
        f.write_bytes(f"writer {i}".encode() * 1000)
        srcs.append(f)
    wins: list[int] = []
    errors: list[str] = []

    def writer(i: int) -> None:
        try:
            write(dest, "race", {"pred.bin": srcs[i]}, metrics={"writer": i})
            wins.append(i)
        except ExpflowError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, (wins, errors)
    assert len(errors) == n - 1 and all("already exists" in e for e in errors)
    path = dest / "race"
    assert verify_bundle(path) == []
    winner = wins[0]
    assert json.loads((path / "metrics.json").read_text()) == {"writer": winner}
    assert (path / "pred.bin").read_bytes() == srcs[winner].read_bytes()
    assert [p.name for p in dest.iterdir()] == ["race"]


def test_missing_source_leaves_nothing_behind(tmp_path: Path, sources) -> None:
    dest = tmp_path / "subs"
    files = {**sources, "gone.h5": tmp_path / "nope.h5"}
    with pytest.raises(ExpflowError) as info:
        write(dest, "b1", files)
    assert "gone.h5" in str(info.value) and "nope.h5" in str(info.value)
    assert "does not exist" in str(info.value)
    assert not dest.exists()


def test_failure_midway_removes_the_partial_bundle(tmp_path, sources, monkeypatch) -> None:
    dest = tmp_path / "subs"
    dest.mkdir()
    real_copy = submission._copy
    copied: list[Path] = []

    def copy_then_fail(src: Path, dst: Path):
        if copied:
            raise ExpflowError("disk full (simulated)")
        copied.append(dst)
        return real_copy(src, dst)

    monkeypatch.setattr(submission, "_copy", copy_then_fail)
    with pytest.raises(ExpflowError, match="simulated"):
        write(dest, "b1", sources)
    assert copied and list(dest.iterdir()) == []


def test_manifest_detects_tampering(tmp_path: Path, sources) -> None:
    path = write(tmp_path / "subs", "b1", sources)
    pred = path / "pred.hdf5"
    data = bytearray(pred.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    pred.write_bytes(bytes(data))
    (path / "extra" / "notes.txt").unlink()
    (path / "sneaky.txt").write_text("added later")
    (path / "params.json").write_text('{"lr": 0.1}\n')
    problems = verify_bundle(path)
    text = "\n".join(problems)
    assert any(p.startswith("pred.hdf5: checksum mismatch") for p in problems), text
    assert "extra/notes.txt: missing" in problems
    assert "sneaky.txt: not listed in the manifest" in problems
    assert any(p.startswith("params.json: size") for p in problems), text


def test_verify_reports_a_missing_bundle_or_manifest(tmp_path: Path, sources) -> None:
    assert "does not exist" in verify_bundle(tmp_path / "nothing")[0]
    path = write(tmp_path / "subs", "b1", sources)
    (path / "manifest.json").unlink()
    assert "manifest.json" in verify_bundle(path)[0]


def test_secrets_are_scrubbed_from_params_and_manifest(tmp_path: Path, sources) -> None:
    path = write(
        tmp_path / "subs",
        "b1",
        sources,
        params={
            "lr": 0.001,
            "api_key": "sk-live-abc123",
            "nested": {"HF_TOKEN": "hf_secretvalue", "depth": 3},
            "callbacks": [{"wandb_password": "pw-1"}],
        },
        info={"study": "s1", "clearml_secret": "cm-xyz", "Deploy_PIN": "4321"},
    )
    params = json.loads((path / "params.json").read_text())
    assert params == {
        "lr": 0.001,
        "api_key": "***",
        "nested": {"HF_TOKEN": "***", "depth": 3},
        "callbacks": [{"wandb_password": "***"}],
    }
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["info"] == {"study": "s1", "clearml_secret": "***", "Deploy_PIN": "***"}
    everything = b"".join(snapshot(path).values())
    for secret in (b"sk-live-abc123", b"hf_secretvalue", b"pw-1", b"cm-xyz", b"4321"):
        assert secret not in everything
    assert verify_bundle(path) == []


def test_scrub_is_recursive_and_does_not_mutate() -> None:
    original = {"Token": "t", "a": [{"monkey_key": 1}, ("x", {"secret": 2})], "ok": 1}
    assert scrub(original) == {
        "Token": "***",
        "a": [{"monkey_key": "***"}, ("x", {"secret": "***"})],
        "ok": 1,
    }
    assert original["Token"] == "t"
    assert scrub({"pin_memory": True}, keep={"pin_memory"}) == {"pin_memory": True}
    assert scrub("plain") == "plain"


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "", ".hidden", "a b", "-x", "a..b", "x\n"])
def test_bad_bundle_names(tmp_path: Path, sources, name: str) -> None:
    with pytest.raises(ExpflowError) as info:
        write(tmp_path / "subs", name, sources)
    assert "letters, digits, '.', '_' and '-'" in str(info.value)
    assert not (tmp_path / "subs").exists()


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("../evil.txt", "is not allowed"),
        ("/abs.txt", "is not allowed"),
        ("a//b.txt", "is not allowed"),
        ("manifest.json", "is reserved"),
        ("params.json", "is reserved"),
    ],
)
def test_bad_file_names_inside_the_bundle(tmp_path, sources, key: str, fragment: str) -> None:
    with pytest.raises(ExpflowError, match=fragment):
        write(tmp_path / "subs", "b1", {key: sources["pred.hdf5"]})
    assert not (tmp_path / "subs").exists()


def test_directory_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExpflowError, match="not a regular file"):
        write(tmp_path / "subs", "b1", {"dir": tmp_path})
