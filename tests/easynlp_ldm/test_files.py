"""files.py: whole files or nothing, and weights that never run code."""

import errno
import os

import pytest
import torch

from easynlp_ldm.errors import UserError
from easynlp_ldm.files import (
    WeightsError,
    WriteFailed,
    atomic_copy,
    atomic_files,
    atomic_folder,
    atomic_open,
    atomic_replace_folder,
    atomic_torch_save,
    atomic_write_bytes,
    load_state_dict_file,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.tsv"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as handle:
            handle.write(b"half")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.tsv"]
    atomic_write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.tsv"]


def test_write_failure_is_one_line_user_error_keeping_errno(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed) as caught:
        atomic_write_bytes(str(tmp_path / "x.bin"), b"data")
    err = caught.value
    assert isinstance(err, UserError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err) == f"{tmp_path / 'x.bin'}: cannot write (No space left on device); the previous version, if " \
                       f"any, is intact"
    assert os.listdir(tmp_path) == []


def test_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_folder(str(target)) as folder:
            open(os.path.join(folder, "a"), "w").close()
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    with atomic_folder(str(target)) as folder:
        atomic_copy(__file__, os.path.join(folder, "copy.py"))
    assert os.listdir(target) == ["copy.py"]
    with pytest.raises(UserError, match="exists and is not empty"):
        with atomic_folder(str(target)):
            pass


def test_replaced_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "state"
    for content in (b"first", b"second"):
        with atomic_replace_folder(str(target)) as folder:
            atomic_write_bytes(os.path.join(folder, "f"), content)
        assert (target / "f").read_bytes() == content and os.listdir(tmp_path) == ["state"]
    (tmp_path / "state.tmp").mkdir()  # what a killed writer left: cleared
    with pytest.raises(WriteFailed, match="No space left"):
        with atomic_replace_folder(str(target)) as folder:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "f").read_bytes() == b"second" and os.listdir(tmp_path) == ["state"]


def test_library_files_are_renamed_in_one_by_one_the_named_one_last(tmp_path, monkeypatch):
    (tmp_path / "model.xml").write_bytes(b"old")
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(dst)), replace(src, dst)))
    with atomic_files(str(tmp_path), last="model.xml") as staging:
        for name in ("model.xml", "model.bin", "a.bin"):
            (tmp_path / staging / name).write_bytes(b"new " + name.encode())
        assert (tmp_path / "model.xml").read_bytes() == b"old"
    assert renamed == ["a.bin", "model.bin", "model.xml"]
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "model.bin", "model.xml"]  # no staging folder left
    assert (tmp_path / "model.xml").read_bytes() == b"new model.xml"
    with pytest.raises(WriteFailed, match=f"{tmp_path}: cannot write"):
        with atomic_files(str(tmp_path)) as staging:
            (tmp_path / staging / "model.xml").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "model.xml").read_bytes() == b"new model.xml" and len(os.listdir(tmp_path)) == 3


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_load_safely_whatever_the_wrapper(tmp_path):
    state = {"w": torch.ones(2)}
    for wrapper in ("params_ema", "params", "state_dict"):
        atomic_torch_save({wrapper: state}, str(tmp_path / "w.pth"))
        assert torch.equal(load_state_dict_file(str(tmp_path / "w.pth"))["w"], state["w"])
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_state_dict_file(str(tmp_path / "w.safetensors"))["w"], state["w"])
    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(WeightsError, match="evil.bin: cannot read weights safely"):
        load_state_dict_file(str(tmp_path / "evil.bin"))
    with pytest.raises(WeightsError, match="missing.bin: file not found"):
        load_state_dict_file(str(tmp_path / "missing.bin"))
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(WeightsError, match="not a plain state dict of tensors"):
        load_state_dict_file(str(tmp_path / "mixed.bin"))
