"""npllama.io.atomic: files and folders replaced whole or not at all, with ordinary modes; stale temps swept."""
from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from npllama.io.atomic import TEMP_PREFIX, atomic_dir, atomic_path, remove_stale_temps
from npllama.io.safetensors import save_file


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_success_replaces_the_target_with_an_ordinary_files_mode(tmp_path, umask_022):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with atomic_path(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
        assert target.read_text() == "old"                 # nothing visible until the block ends
    assert target.read_text() == "new" and _mode(target) == umask_022
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_an_error_leaves_the_target_and_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(str(target), fsync=True) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_saved_weights_are_not_private_files(tmp_path, umask_022):
    save_file({"w": np.ones((2, 3), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    assert _mode(tmp_path / "model.safetensors") == umask_022      # mkstemp alone would give 0600


# ---------------------------------------------------------------- folders
def _tree(d) -> dict:
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f)).read()
            for r, _, fs in os.walk(d) for f in fs}


def _fill(tmp, files):
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)


@pytest.fixture
def old_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.txt").write_text("old a")
    (d / "keep.txt").write_text("theirs")
    return d


def test_dir_success_replaces_the_folder_whole(old_dir, tmp_path, umask_022):
    with atomic_dir(str(old_dir)) as tmp:
        _fill(tmp, {"a.txt": "new a", "b.txt": "new b"})
        assert _tree(old_dir) == {"a.txt": "old a", "keep.txt": "theirs"}    # nothing visible yet
    assert _tree(old_dir) == {"a.txt": "new a", "b.txt": "new b"}
    assert _mode(old_dir) == 0o755                                           # not mkdtemp's 0700
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                         # no temp, no old copy left


def test_dir_failure_in_the_body_leaves_the_old_folder_and_no_temp(old_dir, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(str(old_dir), fsync=True) as tmp:
            _fill(tmp, {"a.txt": "half"})
            raise RuntimeError("boom")
    assert _tree(old_dir) == {"a.txt": "old a", "keep.txt": "theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_dir_failed_rename_puts_the_old_folder_back(old_dir, tmp_path, monkeypatch):
    real = os.rename

    def refuse(src, dst):
        if os.path.basename(src).startswith(TEMP_PREFIX + "ckpt-") and dst == str(old_dir):
            raise OSError(errno.EXDEV, "cross-device link", src)
        return real(src, dst)
    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError):
        with atomic_dir(str(old_dir)) as tmp:
            _fill(tmp, {"a.txt": "new a"})
    assert _tree(old_dir) == {"a.txt": "old a", "keep.txt": "theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_dir_merge_keeps_the_folders_other_files(old_dir, tmp_path):
    with atomic_dir(str(old_dir), existing="merge") as tmp:
        _fill(tmp, {"a.txt": "new a", "b.txt": "new b"})
    assert _tree(old_dir) == {"a.txt": "new a", "b.txt": "new b", "keep.txt": "theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    with atomic_dir(str(tmp_path / "fresh"), existing="merge") as tmp:      # no folder yet: it is made whole
        _fill(tmp, {"x": "1"})
    assert _tree(tmp_path / "fresh") == {"x": "1"}


def test_dir_keep_lets_the_first_writer_win(old_dir, tmp_path):
    with atomic_dir(str(old_dir), existing="keep") as tmp:
        _fill(tmp, {"a.txt": "late"})
    assert _tree(old_dir) == {"a.txt": "old a", "keep.txt": "theirs"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_full_disk_names_the_target(old_dir, tmp_path):
    for ctx, target in ((atomic_dir, old_dir), (atomic_path, tmp_path / "f.bin")):
        with pytest.raises(OSError) as e:
            with ctx(str(target)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))    # what a write() raises: no file name
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
        assert str(target) in str(e.value)
    assert _tree(old_dir) == {"a.txt": "old a", "keep.txt": "theirs"}


def test_stale_temps_are_removed_and_nothing_else(tmp_path):
    (tmp_path / (TEMP_PREFIX + "d")).mkdir()
    (tmp_path / (TEMP_PREFIX + "d") / "x").write_text("half")
    (tmp_path / (TEMP_PREFIX + "f")).write_text("half")
    (tmp_path / "model.tmp").write_text("a user's file")
    assert remove_stale_temps(str(tmp_path)) == [TEMP_PREFIX + "d", TEMP_PREFIX + "f"]
    assert os.listdir(tmp_path) == ["model.tmp"]
    assert remove_stale_temps(str(tmp_path / "missing")) == []
    (tmp_path / (TEMP_PREFIX + "step_000002-ab")).mkdir()
    (tmp_path / (TEMP_PREFIX + "notes")).write_text("a user's file")
    assert remove_stale_temps(str(tmp_path), targets=("step_",)) == [TEMP_PREFIX + "step_000002-ab"]
    assert sorted(os.listdir(tmp_path)) == [TEMP_PREFIX + "notes", "model.tmp"]
