import os

import pytest

from easynlp_ldm.errors import UserError
from easynlp_ldm.hub import resolve_model


def test_local_folder_absolute_and_relative(tmp_path, monkeypatch):
    folder = tmp_path / "alibaba-pai" / "pai-diffusion-general-large-zh"
    folder.mkdir(parents=True)
    assert resolve_model(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("alibaba-pai/pai-diffusion-general-large-zh") == str(folder)


def test_local_folder_wins_over_embedded(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo", embedded={"demo": "/embedded/demo"}) == str(tmp_path / "demo")


def test_embedded_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo", embedded={"demo": "/embedded/demo"}) == "/embedded/demo"


def test_modelzoo_base_dir(tmp_path, monkeypatch):
    (tmp_path / "zoo" / "org" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/m", modelzoo_base_dir=str(tmp_path / "zoo")) == str(tmp_path / "zoo" / "org" / "m")


def test_hf_cache_entry_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--alibaba-pai--pai-diffusion-general-large-zh"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    found = resolve_model("alibaba-pai/pai-diffusion-general-large-zh")
    assert found == os.path.join(str(cache), "models--alibaba-pai--pai-diffusion-general-large-zh", "snapshots",
                                 "abc123")


def test_missing_model_is_one_line_error_saying_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        resolve_model("alibaba-pai/pai-diffusion-general-large-zh")
    message = str(err.value)
    assert "alibaba-pai/pai-diffusion-general-large-zh" in message and "never downloads" in message
    assert "pass the folder" in message and "\n" not in message


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(str(path))
