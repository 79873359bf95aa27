import os

from easynlp_ldm.training_state import _link_files


def test_last_folder_shares_the_best_files_instead_of_a_second_copy(tmp_path):
    # when the final weights are also the best, last/ gets hard links to the files just written
    out, last = tmp_path / "out", tmp_path / "out" / "last"
    out.mkdir()
    last.mkdir()
    (last / "pytorch_model.bin").write_bytes(b"older weights")
    files = []
    for name, data in (("config.json", b"{}"), ("pytorch_model.bin", b"new weights")):
        (out / name).write_bytes(data)
        files.append(str(out / name))
    assert _link_files(files, str(last), str(out))
    for path in files:
        assert os.path.samefile(path, last / os.path.basename(path))
    assert (last / "pytorch_model.bin").read_bytes() == b"new weights"
    assert sorted(os.listdir(last)) == ["config.json", "pytorch_model.bin"]  # no temporary names left behind
    (out / "transformer").mkdir()  # a model of subfolders (a diffusers folder) keeps them
    (out / "transformer" / "config.json").write_bytes(b"{}")
    assert _link_files([str(out / "transformer" / "config.json")], str(last), str(out))
    assert os.path.samefile(out / "transformer" / "config.json", last / "transformer" / "config.json")
    assert not _link_files([], str(last), str(out)) and not _link_files(None, str(last), str(out))  # caller writes
