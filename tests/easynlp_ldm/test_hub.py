import json
import os
import socket

import huggingface_hub.constants
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


MAIN = "a" * 40
OLDER = "b" * 40
NEWER = "c" * 40
REPO = "alibaba-pai/pai-diffusion-general-large-zh"


def _hf_env(monkeypatch, tmp_path, **env):
    """Only the HF cache variables given here are set; set after huggingface_hub was imported, on purpose."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(tmp_path)


def _snapshot(cache, commit, repo=REPO, main=False, mtime=None):
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    folder = repo_dir / "snapshots" / commit
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    if main:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return str(folder)


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


@pytest.mark.parametrize("variable, cache_of", [("HF_HUB_CACHE", lambda d: d), ("HUGGINGFACE_HUB_CACHE", lambda d: d),
                                                ("HF_HOME", lambda d: d / "hub"), ("XDG_CACHE_HOME",
                                                                                  lambda d: d / "huggingface" / "hub")])
def test_cache_location_read_from_the_environment_at_lookup_time(tmp_path, monkeypatch, variable, cache_of):
    folder = _snapshot(cache_of(tmp_path / "where"), MAIN, main=True)
    _hf_env(monkeypatch, tmp_path, **{variable: tmp_path / "where"})
    assert resolve_model(REPO) == folder


def test_refs_main_wins_over_a_newer_snapshot_in_any_cache(tmp_path, monkeypatch):
    _snapshot(tmp_path / "first", NEWER, mtime=2_000_000_000)
    main = _snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", MAIN, main=True, mtime=1_000_000_000)
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=tmp_path / "first")
    assert resolve_model(REPO) == main


def test_without_refs_main_the_newest_snapshot_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _snapshot(cache, OLDER, mtime=1_000_000_000)
    newer = _snapshot(cache, NEWER, mtime=2_000_000_000)
    (cache / "models--alibaba-pai--pai-diffusion-general-large-zh" / "refs").mkdir()
    (cache / "models--alibaba-pai--pai-diffusion-general-large-zh" / "refs" / "fp16").write_text(NEWER)
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=cache)
    assert resolve_model(REPO) == newer


def test_refs_main_naming_a_missing_snapshot_falls_back_to_the_newest(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    kept = _snapshot(cache, OLDER)
    refs = cache / "models--alibaba-pai--pai-diffusion-general-large-zh" / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN)
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=cache)
    assert resolve_model(REPO) == kept


def test_incomplete_snapshot_is_a_one_line_error_not_an_older_one(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    _snapshot(cache, OLDER, mtime=1_000_000_000)
    _snapshot(cache, MAIN, main=True, mtime=2_000_000_000)
    trees = cache / "models--alibaba-pai--pai-diffusion-general-large-zh" / "trees"
    trees.mkdir()
    listing = {name: {"size": 2, "blob_id": "0" * 40} for name in ("model_index.json", "unet/model.safetensors")}
    (trees / f"{MAIN}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=cache)
    with pytest.raises(UserError) as err:
        resolve_model(REPO, what="--checkpoint_dir")
    message = str(err.value)
    assert message.startswith(f"--checkpoint_dir '{REPO}' is only partly in the Hugging Face cache")
    assert "never downloads" in message and "pass the folder" in message and "\n" not in message


def test_name_without_namespace_and_names_that_are_no_repo_id(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    folder = _snapshot(cache, MAIN, repo="demo", main=True)
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=cache)
    assert resolve_model("demo") == folder
    for name in ("a/b/c", "../demo", "./missing", "bad--name"):
        with pytest.raises(UserError, match="not found"):
            resolve_model(name)


def test_no_network_even_when_offline_mode_is_off(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    cache = tmp_path / "hub"
    folder = _snapshot(cache, NEWER)
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=cache)
    assert resolve_model(REPO) == folder
    with pytest.raises(UserError, match="not found"):
        resolve_model("someone/not-cached")


def test_easynlp_local_modelzoo(tmp_path, monkeypatch):
    """EasyNLP unpacks a model name's archive under $EASYNLP_CACHE_ROOT/modelzoo at the path its name map gives."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("EASYNLP_CACHE_ROOT", str(tmp_path / "easynlp"))
    monkeypatch.chdir(tmp_path)
    zoo = tmp_path / "easynlp" / "modelzoo"
    (zoo / "alibaba-pai" / "pai-painter-base-zh").mkdir(parents=True)
    (zoo / "modelzoo_alibaba.json").write_text(json.dumps({"pai-painter-base-zh":
                                                           "alibaba-pai/pai-painter-base-zh.tgz"}))
    assert resolve_model("pai-painter-base-zh") == str(zoo / "alibaba-pai" / "pai-painter-base-zh")
    assert resolve_model("alibaba-pai/pai-painter-base-zh") == str(zoo / "alibaba-pai" / "pai-painter-base-zh")
    with pytest.raises(UserError):
        resolve_model("pai-painter-large-zh")


MS_REPO = "Tongyi-MAI/Z-Image-Turbo"
DOTTED = "Qwen/Qwen2.5-Image"  # ModelScope's SDKs before 1.38 store its files in Qwen/Qwen2___5-Image


def _ms_env(monkeypatch, tmp_path, cache=None):
    """A ModelScope cache at ``cache`` (``$MODELSCOPE_CACHE``), or at its default under HOME = tmp_path/home; empty
    Hugging Face caches and EasyNLP zoo."""
    _hf_env(monkeypatch, tmp_path, HF_HUB_CACHE=tmp_path / "hf-empty")
    monkeypatch.setenv("EASYNLP_CACHE_ROOT", str(tmp_path / "easynlp-empty"))
    if cache is None:
        monkeypatch.delenv("MODELSCOPE_CACHE", raising=False)
        return tmp_path / "home" / ".cache" / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    return cache


def _ms_model(folder, marker="model_index.json", mtime=None):
    folder.mkdir(parents=True)
    (folder / marker).write_text("{}")
    (folder / ".mdl").write_bytes(b"written by the SDK, never read here")
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return str(folder)


@pytest.mark.parametrize("layout", ["models/Qwen/Qwen2___5-Image", "hub/models/Qwen/Qwen2___5-Image",
                                    "models/Qwen--Qwen2.5-Image/snapshots/master", "Qwen/Qwen2.5-Image",
                                    "Qwen/Qwen2___5-Image", "hub/Qwen/Qwen2.5-Image", "hub/Qwen/Qwen2___5-Image"])
def test_modelscope_cache_layouts_of_every_sdk_version(tmp_path, monkeypatch, layout):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    folder = _ms_model(cache / layout)
    assert resolve_model(DOTTED, what="pretrain_model_name_or_path") == folder


def test_modelscope_default_cache_under_home(tmp_path, monkeypatch):
    """`modelscope download --model Tongyi-MAI/Z-Image-Turbo` with SDK 1.2x-1.37 (root ~/.cache/modelscope/hub), then
    with SDK 1.38+ (root ~/.cache/modelscope, which reuses the older folder first)."""
    cache = _ms_env(monkeypatch, tmp_path)
    new = _ms_model(cache / "models" / "Tongyi-MAI--Z-Image-Turbo" / "snapshots" / "master")
    assert resolve_model(MS_REPO) == new
    old = _ms_model(cache / "hub" / "models" / "Tongyi-MAI" / "Z-Image-Turbo", marker="config.json")
    assert resolve_model(MS_REPO) == old


def test_modelscope_comes_after_every_other_place(tmp_path, monkeypatch):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    in_modelscope = _ms_model(cache / "models" / "alibaba-pai" / "pai-diffusion-general-large-zh")
    assert resolve_model(REPO) == in_modelscope
    zoo = tmp_path / "easynlp" / "modelzoo" / "alibaba-pai" / "pai-diffusion-general-large-zh"
    zoo.mkdir(parents=True)
    monkeypatch.setenv("EASYNLP_CACHE_ROOT", str(tmp_path / "easynlp"))
    assert resolve_model(REPO) == str(zoo)
    in_hf = _snapshot(tmp_path / "hf", MAIN, main=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert resolve_model(REPO) == in_hf
    assert resolve_model(REPO, embedded={REPO: "/embedded"}) == "/embedded"
    local = tmp_path / "alibaba-pai" / "pai-diffusion-general-large-zh"
    local.mkdir(parents=True)
    assert resolve_model(REPO) == str(local)


def test_modelscope_snapshot_master_then_main_then_newest(tmp_path, monkeypatch):
    snapshots = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms") / "models" / "Tongyi-MAI--Z-Image-Turbo" / \
        "snapshots"
    (snapshots / "empty-newest").mkdir(parents=True)  # the SDK skips an empty snapshot folder too
    _ms_model(snapshots / "v1.0", mtime=1_000_000_000)
    newer = _ms_model(snapshots / "v1.1", mtime=2_000_000_000)
    os.utime(snapshots / "empty-newest", (3_000_000_000, 3_000_000_000))
    assert resolve_model(MS_REPO) == newer
    main = _ms_model(snapshots / "main", mtime=1_500_000_000)
    assert resolve_model(MS_REPO) == main
    master = _ms_model(snapshots / "master", mtime=1_200_000_000)
    assert resolve_model(MS_REPO) == master


def test_an_empty_modelscope_folder_is_passed_over_as_the_sdk_does(tmp_path, monkeypatch):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    (cache / "models" / "Tongyi-MAI" / "Z-Image-Turbo").mkdir(parents=True)
    flat = _ms_model(cache / "Tongyi-MAI" / "Z-Image-Turbo")
    assert resolve_model(MS_REPO) == flat


def test_a_finished_download_leaves_empty_folders_in_the_temp_folder(tmp_path, monkeypatch):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    folder = _ms_model(cache / "models" / "Tongyi-MAI" / "Z-Image-Turbo")
    (cache / "models" / "._____temp" / "Tongyi-MAI" / "Z-Image-Turbo" / "transformer").mkdir(parents=True)
    assert resolve_model(MS_REPO) == folder


@pytest.mark.parametrize("case", ["temp", "incomplete", "no_index"])
def test_unfinished_modelscope_download_is_a_one_line_error_not_another_copy(tmp_path, monkeypatch, case):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    _ms_model(cache / "Qwen" / "Qwen2___5-Image")  # a complete older copy, never taken instead
    folder = cache / "models" / "Qwen" / "Qwen2___5-Image"
    if case == "temp":  # SDK 1.2x-1.37 interrupted: a file still waits in its temporary folder
        _ms_model(folder)
        temp = cache / "models" / "._____temp" / "Qwen" / "Qwen2.5-Image" / "transformer"
        temp.mkdir(parents=True)
        (temp / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
        where = str(temp.parent)
    elif case == "incomplete":  # SDK 1.38+ interrupted: the file is written beside its final name
        _ms_model(folder)
        (folder / "transformer").mkdir()
        (folder / "transformer" / "diffusion_pytorch_model.safetensors.incomplete").write_bytes(b"half")
        where = str(folder / "transformer" / "diffusion_pytorch_model.safetensors.incomplete")
    else:
        folder.mkdir(parents=True)
        (folder / "transformer").mkdir()
        where = f"{folder} has neither model_index.json nor config.json"
    with pytest.raises(UserError) as err:
        resolve_model(DOTTED, what="--checkpoint_dir")
    message = str(err.value)
    assert message.startswith(f"--checkpoint_dir '{DOTTED}' is only partly in the ModelScope cache: ")
    assert where in message and f"modelscope download --model {DOTTED}" in message and "\n" not in message


def test_not_found_lists_the_places_looked_in_including_modelscope(tmp_path, monkeypatch):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    with pytest.raises(UserError) as err:
        resolve_model(MS_REPO)
    message = str(err.value)
    assert f"ModelScope cache entry ({cache})" in message and str(tmp_path / "hf-empty") in message
    assert str(tmp_path / "easynlp-empty" / "modelzoo") in message and f"modelscope download --model {MS_REPO}" in \
        message and "\n" not in message
    monkeypatch.delenv("MODELSCOPE_CACHE")
    with pytest.raises(UserError, match="ModelScope cache entry .*/home/.cache/modelscope"):
        resolve_model(MS_REPO)


def test_names_that_are_no_modelscope_id_or_are_the_caches_own_folders(tmp_path, monkeypatch):
    cache = _ms_env(monkeypatch, tmp_path, cache=tmp_path / "ms")
    _ms_model(cache / "models" / "Tongyi-MAI" / "Z-Image-Turbo")
    for name in ("models/Tongyi-MAI", "hub/models", "Z-Image-Turbo", "models/Tongyi-MAI/Z-Image-Turbo",
                 ".hidden/Z-Image-Turbo", "Tongyi-MAI/.."):
        with pytest.raises(UserError, match="not found"):
            resolve_model(name)
