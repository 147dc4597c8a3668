"""medsd.generate.storage: atomic writes, temporaries, writability, pyarrow filesystem URIs."""

from __future__ import annotations

import pytest

from medsd.generate.storage import OutputFolder


def test_atomic_write_creates_folders_and_leaves_no_temporary(tmp_path):
    folder = OutputFolder(str(tmp_path / "out"))
    folder.write_atomic("images/edema/a.png", b"png")
    assert (tmp_path / "out/images/edema/a.png").read_bytes() == b"png"
    assert folder.read("images/edema/a.png") == b"png" and folder.read("missing.png") is None
    assert sorted(p.name for p in (tmp_path / "out/images/edema").iterdir()) == ["a.png"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    folder = OutputFolder(str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"), folder.open_atomic("train.csv") as stream:
        stream.write(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_remove_temporaries_sweeps_only_hidden_tmp_files(tmp_path):
    (tmp_path / "images/edema").mkdir(parents=True)
    (tmp_path / "images/edema/.a.png.0f0f.tmp").write_bytes(b"half")
    (tmp_path / "images/edema/a.png").write_bytes(b"whole")
    assert OutputFolder(str(tmp_path)).remove_temporaries() == 1
    assert [p.name for p in (tmp_path / "images/edema").iterdir()] == ["a.png"]


def test_file_uri_and_relative_path_resolve_to_the_same_folder(tmp_path, monkeypatch):
    OutputFolder(f"file://{tmp_path}").write_atomic("x.txt", b"1")
    monkeypatch.chdir(tmp_path)
    assert OutputFolder("x.txt").root == str(tmp_path / "x.txt")
    assert OutputFolder(".").read("x.txt") == b"1"


def test_unwritable_output_folder_names_the_field(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="generate.out: cannot write"):
        OutputFolder(str(blocker / "out")).check_writable()


def test_unknown_uri_scheme_names_the_field():
    with pytest.raises(ValueError, match="generate.out"):
        OutputFolder("nosuchscheme://bucket/x")


def test_is_empty(tmp_path):
    assert OutputFolder(str(tmp_path / "new")).is_empty()
    assert OutputFolder(str(tmp_path)).is_empty()
    (tmp_path / "f").write_text("x")
    assert not OutputFolder(str(tmp_path)).is_empty()
