"""Leftovers of atomic writes (utils/atomic_io.py): a killed writer's temporary files are recognised and removed,
a live writer's and other files are left alone."""

from __future__ import annotations

import os
import subprocess
import sys

from metricsearch.utils.atomic_io import atomic_path, process_is_alive, remove_orphaned_temp_files, temp_file_target


def finished_process_id() -> int:
    """The id of a process that has exited (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_temporary_name_tells_the_file_it_replaces_and_its_writer(tmp_path):
    with atomic_path(tmp_path / "metadata.json") as tmp:
        assert temp_file_target(tmp) == ("metadata.json", os.getpid())
        tmp.write_text("{}")
    assert temp_file_target(tmp_path / "metadata.json") is None
    assert temp_file_target(tmp_path / ".notes.txt") is None


def test_only_the_temporary_files_of_dead_writers_that_the_caller_owns_are_removed(tmp_path):
    dead = finished_process_id()
    assert not process_is_alive(dead) and process_is_alive(os.getpid())
    orphan = tmp_path / f".vectors-1.tmp-{dead}-0a1b2c3d.faiss"
    in_progress = tmp_path / f".vectors-2.tmp-{os.getpid()}-0a1b2c3d.faiss"
    someone_elses = tmp_path / f".notes.tmp-{dead}-0a1b2c3d.txt"
    plain = tmp_path / "vectors-3.faiss"
    for path in (orphan, in_progress, someone_elses, plain):
        path.write_bytes(b"x")
    removed = remove_orphaned_temp_files(tmp_path, replaces=lambda name: name.startswith("vectors-"))
    assert removed == [orphan.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (in_progress, someone_elses, plain))
