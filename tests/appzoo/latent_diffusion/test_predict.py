import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from easynlp_ldm import cli
from tests.helpers import PROMPTS, aigc_fields, decode, predict_argv, read_rows, shows_visible_label


def test_seed_predict_command_as_published(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "T2I_test.tsv").write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(PROMPTS[:3])),
                                           encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    os.symlink(tiny_model_dir, tmp_path / "finetuned_model")
    argv = ["--mode=predict", "--worker_gpu=1", "--tables=T2I_test.tsv", "--input_schema=idx:str:1,text:str:1",
            "--output_schema=text", "--outputs=./output.tsv", "--first_sequence=text",
            "--checkpoint_dir=./finetuned_model", "--random_seed=42", "--logging_steps=100",
            "--save_checkpoint_steps=500", "--sequence_length=32", "--micro_batch_size=16",
            "--app_name=latent_diffusion",
            "--user_defined_parameters=\nn_samples=2\nwrite_image=True\nimage_prefix=./output/\nddim_steps=3\n"]
    assert cli.main(argv) == 0
    rows = read_rows(tmp_path / "output.tsv")
    assert [r[0] for r in rows] == [p for p in PROMPTS[:3] for _ in range(2)]
    for i, prompt in enumerate(PROMPTS[:3]):
        folder = tmp_path / "output" / str(i)
        assert sorted(os.listdir(folder)) == ["0000.png", "0001.png", "line.txt", "prompt.txt"]
        assert (folder / "prompt.txt").read_text(encoding="utf-8").strip() == prompt
        assert Image.open(folder / "0000.png").size == (32, 32)


def test_rows_per_prompt_order_schema_and_append_cols(tiny_model_dir, prompts_table, tmp_path):
    out = str(tmp_path / "o.tsv")
    argv = predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=idx,sample_id,seed,gen_imgbase64",
                        "--append_cols=text", udp="n_samples=2 n_iter=2 ddim_steps=2 image_format=jpeg")
    assert cli.main(argv) == 0
    rows = read_rows(out)
    assert len(rows) == len(PROMPTS) * 4
    assert [(r[0], r[1], r[4]) for r in rows] == [(f"p{i}", str(s), p) for i, p in enumerate(PROMPTS)
                                                  for s in range(4)]
    assert len({r[2] for r in rows}) == len(rows)  # a seed per image
    assert base64.b64decode(rows[0][3])[:2] == b"\xff\xd8"  # JPEG, plain base64 (not b'...')


def test_output_schema_and_size_errors(tiny_model_dir, prompts_table, tmp_path, capsys):
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir,
                                 "--output_schema=idx,image")) == 2
    assert "unknown column 'image'" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="H=34")) == 2
    assert "H=34 must be a multiple of 8" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="sampler=magic")) == 2
    assert "unknown sampler 'magic'" in capsys.readouterr().err
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir, udp="do_sr=True")) == 2
    assert "no RRDB_ESRGAN_x4.pth" in capsys.readouterr().err


def test_micro_batch_size_does_not_change_images(tiny_model_dir, prompts_table, tmp_path):
    a, b = str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")
    assert cli.main(predict_argv(prompts_table, a, tiny_model_dir, "--micro_batch_size=1")) == 0
    assert cli.main(predict_argv(prompts_table, b, tiny_model_dir, "--micro_batch_size=3")) == 0
    for row_a, row_b in zip(read_rows(a), read_rows(b)):
        assert np.abs(decode(row_a[2]) - decode(row_b[2])).max() <= 1


def test_idx_with_dot_dot_cannot_escape_image_prefix(tiny_model_dir, tmp_path):
    table = tmp_path / "evil.tsv"
    table.write_text("../../x\t红色的圆形\n/etc/passwd\t蓝色\n..\t黄色\n", encoding="utf-8")
    prefix = tmp_path / "images"
    assert cli.main(predict_argv(str(table), str(tmp_path / "o.tsv"), tiny_model_dir, "--output_schema=image_path",
                                 udp=f"n_samples=1 ddim_steps=2 write_image=True image_prefix={prefix}")) == 0
    paths = [r[0] for r in read_rows(tmp_path / "o.tsv")]
    assert len(paths) == 3
    for path in paths:
        assert os.path.commonpath([str(prefix), os.path.abspath(path)]) == str(prefix) and os.path.isfile(path)
    assert not (tmp_path.parent / "x").exists()


def test_interrupted_predict_resumes_writing_each_row_once(tiny_model_dir, prompts_table, tmp_path, monkeypatch,
                                                           caplog):
    from appzoo.latent_diffusion import predict

    full, out = str(tmp_path / "full.tsv"), str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, full, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 0
    original, calls = predict.Generator.__call__, {"n": 0}

    def dies_on_third_batch(self, prompts, seeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, prompts, seeds)

    monkeypatch.setattr(predict.Generator, "__call__", dies_on_third_batch)
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 130
    assert len(read_rows(out)) == 8  # two batches of two prompts
    with open(out, "a", encoding="utf-8") as handle:
        handle.write("p4\thalf a row")  # a write cut short by the crash
    monkeypatch.setattr(predict.Generator, "__call__", original)
    caplog.set_level("INFO")
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=2 ddim_steps=2")) == 0
    assert "resuming" in caplog.text and "after input line 4" in caplog.text
    assert read_rows(out) == read_rows(full)
    caplog.clear()
    # Other settings: the output is replaced, and the log says so.
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="n_samples=1 ddim_steps=2")) == 0
    assert "replacing" in caplog.text and len(read_rows(out)) == len(PROMPTS)


def test_resumed_predict_bar_starts_at_the_prompts_already_done(tiny_model_dir, tmp_path, monkeypatch):
    from appzoo.latent_diffusion import predict

    bars = []

    class RecordingBar(predict.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.started_at = self.n
            bars.append(self)

    monkeypatch.setattr(predict, "tqdm", RecordingBar)
    monkeypatch.setenv("EASYNLP_PROGRESS", "1")  # a disabled bar counts nothing
    table = tmp_path / "t.tsv"  # a header and a blank line: the bar counts prompts, not physical lines
    table.write_text("idx\ttext\n" + "".join(f"p{i}\t{p}\n" for i, p in enumerate(PROMPTS[:2]))
                     + "\n" + "".join(f"p{i}\t{p}\n" for i, p in enumerate(PROMPTS[2:], start=2)), encoding="utf-8")
    out = str(tmp_path / "o.tsv")
    argv = predict_argv(str(table), out, tiny_model_dir, "--skip_first_line", udp="n_samples=2 ddim_steps=2")
    original, calls = predict.Generator.__call__, {"n": 0}

    def dies_on_third_batch(self, prompts, seeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, prompts, seeds)

    monkeypatch.setattr(predict.Generator, "__call__", dies_on_third_batch)
    assert cli.main(argv) == 130
    assert (bars[0].total, bars[0].started_at, bars[0].n) == (5, 0, 4)  # two batches of two prompts
    monkeypatch.setattr(predict.Generator, "__call__", original)
    assert cli.main(argv) == 0
    resumed = bars[1]
    assert (resumed.total, resumed.initial, resumed.started_at, resumed.n) == (5, 4, 4, 5)
    assert len(read_rows(out)) == 10


def test_bad_prompt_rows_stop_or_skip(tiny_model_dir, tmp_path, capsys):
    table = tmp_path / "t.tsv"
    table.write_bytes("a\t红色\nb\n".encode() + b"c\t\xff\n" + "d\t绿色\t多一列\n".encode())  # extra columns: ignored
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(str(table), out, tiny_model_dir, udp="n_samples=1 ddim_steps=2")) == 2
    assert f"{table}, line 2: wrong column count" in capsys.readouterr().err
    assert cli.main(predict_argv(str(table), out, tiny_model_dir,
                                 udp="n_samples=1 ddim_steps=2 skip_bad_rows=True")) == 0
    assert [r[0] for r in read_rows(out)] == ["a", "d"]


def test_trained_folder_predicts_alone_and_evaluate_reports_loss(tiny_model_dir, shapes_data, tmp_path, capsys):
    from tests.helpers import train_argv

    out = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=1")) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.json", "pytorch_model.bin", "vocab.txt"):
        os.link(os.path.join(out, name), alone / name)
    assert cli.main(predict_argv(os.path.join(shapes_data, "T2I_test.tsv"), str(tmp_path / "o.tsv"), str(alone),
                                 udp="n_samples=1 ddim_steps=2")) == 0
    assert len(read_rows(tmp_path / "o.tsv")) == 6
    capsys.readouterr()
    assert cli.main(["--mode=evaluate", f"--tables={os.path.join(shapes_data, 'T2I_val.tsv')}",
                     f"--checkpoint_dir={alone}", f"--outputs={tmp_path / 'metrics.json'}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"] == 8 and 0 < printed["val_loss"] < 5
    assert json.load(open(tmp_path / "metrics.json")) == printed


@pytest.mark.parametrize("mode", ["predict", "evaluate", "train"])
def test_missing_unreadable_or_odps_table_is_one_line(tmp_path, capsys, mode):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for table, message in ((str(tmp_path / "nope.tsv"), "nope.tsv: no such file"),
                           ("odps://project/tables/t2i", "odps://project/tables/t2i is a MaxCompute (ODPS) table"),
                           (str(folder), "a_folder is not a file")):
        argv = [f"--mode={mode}", f"--tables={table}", "--input_schema=idx:str:1,text:str:1,imgbase64:str:1",
                f"--outputs={tmp_path / 'o.tsv'}", f"--checkpoint_dir={tmp_path / 'run'}"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_timing_line_separates_the_first_batch_from_the_steady_rate():
    from appzoo.latent_diffusion.predict import timing_summary

    assert timing_summary([(9.0, 16), (2.0, 16), (1.0, 8)]) == (
        "generation: 40 images in 12.0 s; first batch 9.0 s, then 0.125 s/image (steady)")
    assert timing_summary([(3.0, 4)]) == "generation: 4 images in 3.0 s; first batch 3.0 s"


def test_predict_from_a_package_resumes_like_from_a_folder(tiny_model_dir, prompts_table, tmp_path, caplog):
    """A .tar.gz is unpacked in a new temporary folder each run: the run's identity is the package, not that folder."""
    package, out = str(tmp_path / "m.tar.gz"), str(tmp_path / "o.tsv")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={package}"]) == 0
    argv = predict_argv(prompts_table, out, package, udp="n_samples=1 ddim_steps=2 optimize=none")
    assert cli.main(argv) == 0
    caplog.set_level("INFO")
    assert cli.main(argv) == 0
    assert "resuming" in caplog.text and "replacing" not in caplog.text


def test_every_image_carries_the_aigc_label_and_its_produce_id_is_a_column(tiny_model_dir, prompts_table, tmp_path,
                                                                           caplog):
    def run(name, udp, image_format="png", images=None):
        out = str(tmp_path / f"{name}.tsv")
        assert cli.main(predict_argv(prompts_table, out, tiny_model_dir,
                                     "--output_schema=gen_imgbase64,image_path,aigc_produce_id",
                                     udp=f"n_samples=2 ddim_steps=2 optimize=none write_image=True image_format="
                                         f"{image_format} image_prefix={tmp_path / (images or name)} {udp}")) == 0
        return read_rows(out)

    rows = run("labelled", "aigc_producer=某服务")
    ids = [produce_id for _, _, produce_id in rows]
    assert len(set(ids)) == len(rows) == 2 * len(PROMPTS)  # a ProduceID per image
    for cell, path, produce_id in rows:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data == base64.b64decode(cell)  # the file and the TSV cell: the same labelled image
        fields = aigc_fields(data)
        assert fields["Label"] == "1" and fields["ProduceID"] == produce_id and fields["ContentProducer"] == "某服务"
        assert fields["ContentPropagator"].startswith("easynlp-ldm@")
    # The same command again: the same IDs (predict stays reproducible; a resumed run writes what a whole run does)
    assert [r[2] for r in run("again", "aigc_producer=某服务", images="labelled")] == ids
    assert all(aigc_fields(open(path, "rb").read())["ProduceID"] for _, path, _ in run("jpeg", "", "jpeg"))
    caplog.set_level("WARNING")
    unlabelled = run("off", "aigc_label=False")
    assert "aigc_label=False: the images carry no AIGC label" in caplog.text
    visible = run("visible", "aigc_visible_label=True")
    for (cell, _, _), (plain, _, produce_id), (shown, _, _) in zip(rows, unlabelled, visible):
        assert produce_id == "" and aigc_fields(base64.b64decode(plain)) is None
        assert (decode(cell) == decode(plain)).all()  # the implicit label never changes the pixels
        assert shows_visible_label(Image.open(io.BytesIO(base64.b64decode(shown))))
        assert not shows_visible_label(Image.open(io.BytesIO(base64.b64decode(cell))))
        assert aigc_fields(base64.b64decode(shown))["Label"] == "1"
