"""Atomic writes leave nothing half-written and finish with ordinary permissions."""

import os

import pytest

from tropd_cli.files import atomic_folder, atomic_write_text


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_text_has_plain_file_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_atomic_folder_has_plain_permissions_and_replaces_the_target(tmp_path, umask_022):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")

    def fill(folder):
        (folder / "sub").mkdir()
        handle = os.open(folder / "sub" / "secret", os.O_CREAT | os.O_WRONLY, 0o600)  # like a temp-file writer
        os.close(handle)

    atomic_folder(target, fill)
    assert sorted(p.name for p in target.rglob("*")) == ["secret", "sub"]
    assert [oct(p.stat().st_mode & 0o777) for p in (target, target / "sub", target / "sub" / "secret")] == \
        ["0o755", "0o755", "0o644"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def test_atomic_folder_leaves_the_old_target_when_filling_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")

    def fail(folder):
        (folder / "half").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_folder(target, fail)
    assert [p.name for p in target.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["out"]
