"""Training images as users have them: aspect-ratio buckets, crops, small images."""

import numpy as np
import pytest
from PIL import Image

from appzoo.latent_diffusion.data import bucket_sizes, choose_bucket, kept_share, preprocess_image
from easynlp_ldm import cli
from tests.helpers import mixed_aspect_data, saved_weights, train_argv


def test_buckets_hold_the_training_area_in_steps_of_the_downsampling_factor():
    sizes = bucket_sizes(512, 32)
    assert (512, 512) in sizes
    for width, height in sizes:
        assert width % 32 == 0 and height % 32 == 0
        assert 0.85 * 512 * 512 <= width * height <= 512 * 512, (width, height)
        assert 1 / 4 <= width / height <= 4


@pytest.mark.parametrize("image", [(1280, 427), (427, 640), (640, 427), (1024, 768), (512, 512), (3000, 1000)],
                         ids=["panorama", "portrait", "landscape", "4:3", "square", "3:1"])
def test_photos_land_in_buckets_keeping_nine_tenths_of_their_pixels(image):
    bucket = choose_bucket(*image, bucket_sizes(512, 32))
    assert kept_share(*image, bucket) >= 0.9, bucket
    # against the square centre crop, which keeps a third of the panorama
    if image == (1280, 427):
        assert kept_share(*image, (512, 512)) < 0.34


def test_an_image_resized_to_its_bucket_keeps_its_content_uncropped_when_ratios_match():
    # a 96×32 image whose left third is red: in a 48×16 bucket the red third is still there (a square crop of the
    # centre would have cut it away)
    array = np.zeros((32, 96, 3), np.uint8)
    array[:, :32] = (255, 0, 0)
    pixels = preprocess_image(Image.fromarray(array), (48, 16))
    assert pixels.shape == (3, 16, 48)
    assert float(pixels[0, :, :14].mean()) > 0.9 and float(pixels[0, :, 18:].mean()) < -0.9
    square = preprocess_image(Image.fromarray(array), 32)
    assert float(square[0].max()) < -0.9  # the square centre crop lost it


def test_bucketed_training_batches_one_bucket_at_a_time_and_logs_them(tiny_model_dir, shapes_data, tmp_path, caplog,
                                                                     monkeypatch):
    from appzoo.latent_diffusion import train_tasks

    caplog.set_level("INFO")
    data = mixed_aspect_data(shapes_data, str(tmp_path / "data"))
    shapes = []
    original = train_tasks.DiffusionTrainTask.loss

    def loss(self, batch):
        shapes.append(tuple(batch["moments"].shape[2:]))
        return original(self, batch)

    monkeypatch.setattr(train_tasks.DiffusionTrainTask, "loss", loss)
    out = str(tmp_path / "run")
    assert cli.main(train_argv(data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1")) == 0
    # 32 rows: 11 wide (96×32 → 48×16), 11 tall (40×64 → 24×40), 10 square; latents are half the size
    assert "aspect-ratio buckets (width×height: images): 24×40: 11, 32×32: 10, 48×16: 11" in caplog.text
    assert sorted(set(shapes)) == [(8, 24), (16, 16), (20, 12)]
    assert len(shapes) == 6  # 8 + 3, 8 + 2, 8 + 3: a short batch per bucket, none mixed


def test_without_buckets_images_are_square_and_center_crop_false_crops_at_random(tiny_model_dir, shapes_data,
                                                                                tmp_path, caplog):
    caplog.set_level("INFO")
    data = mixed_aspect_data(shapes_data, str(tmp_path / "data"))
    runs = {}
    for name, udp in (("centre", "bucket=False"), ("random", "bucket=False center_crop=False")):
        runs[name] = str(tmp_path / name)
        assert cli.main(train_argv(data, runs[name], tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1",
                                   udp=udp)) == 0
    assert "aspect-ratio buckets" not in caplog.text
    assert "center_crop=False: images are cropped at a seeded random position" in caplog.text
    a, b = saved_weights(runs["centre"]), saved_weights(runs["random"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 0  # the crop did something


def test_small_images_are_named_and_can_be_left_out(tiny_model_dir, shapes_data, tmp_path, caplog):
    caplog.set_level("INFO")
    data = mixed_aspect_data(shapes_data, str(tmp_path / "data"), sizes=((32, 32), (32, 32), (12, 12)))
    out = str(tmp_path / "run")
    assert cli.main(train_argv(data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1")) == 0
    assert "10 images are far smaller than the training size" in caplog.text and "lines 3, 6, 9," in caplog.text
    assert "step 4/4" in caplog.text  # kept: 32 rows
    caplog.clear()
    assert cli.main(train_argv(data, str(tmp_path / "skip"), tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1",
                               udp="skip_small_images=True")) == 0
    assert "left out (skip_small_images=True)" in caplog.text and "step 3/3" in caplog.text  # 22 rows
