"""easynlp_ldm/aigc.py and encode_image's labels: GB 45438's fields read back by exiftool, pixels untouched by the
implicit label, the visible label in the corner, labels off with a warning."""

import io
import logging
import os
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from easynlp_ldm.aigc import (
    DISABLED_WARNING,
    NAMESPACE,
    AigcLabels,
    derived_id,
    draw_visible_label,
    visible_label_box,
    visible_mask,
)
from easynlp_ldm.tables import encode_image
from tests.helpers import ROOT, aigc_fields, photo, shows_visible_label

FIELDS = ["Label", "ContentProducer", "ProduceID", "ReservedCode1", "ContentPropagator", "PropagateID",
          "ReservedCode2"]


def pixels(data: bytes):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.append((kind, data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def test_png_carries_the_fields_in_xmp_and_a_text_chunk_with_the_pixel_data_unchanged():
    image = photo(3, (64, 48))
    label = AigcLabels(producer="某服务 备案号123", propagator="cdn.example").label()
    labelled, plain = encode_image(image, "png", label=label), encode_image(image, "png")
    fields = aigc_fields(labelled)
    assert list(fields) == FIELDS
    assert fields == {"Label": "1", "ContentProducer": "某服务 备案号123", "ProduceID": label.produce_id,
                      "ReservedCode1": "", "ContentPropagator": "cdn.example", "PropagateID": label.produce_id,
                      "ReservedCode2": ""}
    chunks = png_chunks(labelled)
    xmp = next(body for kind, body in chunks if kind == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\0"))
    assert xmp[len(b"XML:com.adobe.xmp\0")] == 0  # not compressed, as XMP's specification asks
    assert NAMESPACE.encode() in xmp and b"<TC260:AIGC>" in xmp
    # The same image data, byte for byte: only metadata chunks were added.
    assert [body for kind, body in chunks if kind == b"IDAT"] == \
        [body for kind, body in png_chunks(plain) if kind == b"IDAT"]
    assert aigc_fields(plain) is None


def test_jpeg_carries_them_in_its_xmp_segment_with_the_same_pixels():
    image = photo(4, (48, 40))
    label = AigcLabels().label()
    labelled, plain = encode_image(image, "jpeg", label=label), encode_image(image, "jpeg")
    assert labelled[:2] == b"\xff\xd8" and b"http://ns.adobe.com/xap/1.0/\0" in labelled
    assert aigc_fields(labelled)["ProduceID"] == label.produce_id
    assert (pixels(labelled) == pixels(plain)).all()
    assert aigc_fields(plain) is None


def test_produce_ids_differ_between_images_and_parties_default_to_this_toolkit_on_this_host():
    labels = AigcLabels()
    ids = {labels.label().produce_id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 32 for i in ids)
    assert labels.producer == labels.propagator == f"easynlp-ldm@{socket.gethostname()}"
    assert derived_id("run", 1, 0) == derived_id("run", 1, 0)
    assert len({derived_id("run", 1, 0), derived_id("run", 1, 1), derived_id("run", 2, 0),
                derived_id("other", 1, 0)}) == 4


def test_labels_off_give_no_fields_and_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="easynlp.aigc")
    labels = AigcLabels.configured(False, True)
    assert DISABLED_WARNING in caplog.text and "\n" not in DISABLED_WARNING
    assert labels.label() is None and labels.label(visible=True) is None
    image = photo(5, (40, 40))
    assert encode_image(image, "png", label=labels.label()) == encode_image(image, "png")
    caplog.clear()
    AigcLabels.configured(True, False)
    assert not caplog.text


@pytest.mark.parametrize("size", [(512, 512), (768, 512), (64, 64), (32, 32)])
def test_visible_label_in_the_corner_scaled_to_the_image_and_nothing_else_changed(size):
    image = photo(6, size)
    labels = AigcLabels(visible=False)
    shown = pixels(encode_image(image, "png", label=labels.label(visible=True)))
    plain = pixels(encode_image(image, "png", label=labels.label()))
    assert (plain == np.asarray(image, dtype=np.int16)).all()  # off: the generated pixels exactly
    (left, top, right, bottom), (text_w, text_h), _ = visible_label_box(*size)
    assert right <= size[0] and bottom <= size[1] and left >= 0 and top >= 0
    assert right > size[0] * 0.85 and bottom > size[1] * 0.85  # bottom-right
    if min(size) >= 240:  # 5 % of the short side; smaller images get the legible minimum (or fit the width)
        assert text_h == round(0.05 * min(size))
    elif size[0] >= 64:
        assert text_h == 12
    outside = np.ones(shown.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert (shown[outside] == plain[outside]).all()
    assert (shown[~outside] != plain[~outside]).any()
    assert shows_visible_label(Image.fromarray(shown.astype(np.uint8)))
    assert not shows_visible_label(image)


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (250, 250, 40)])
def test_visible_label_has_contrast_on_any_background(colour):
    image = Image.new("RGB", (256, 256), colour)
    assert shows_visible_label(draw_visible_label(image))


def test_the_shipped_mask_is_package_data_and_the_script_makes_it():
    asset = os.path.join(ROOT, "easynlp_ldm", "assets", "aigc_label.png")
    assert os.path.getsize(asset) < 16_000
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        assert '"easynlp_ldm": ["assets/*.png"]' in handle.read()
    mask = visible_mask()
    assert mask.mode == "L" and 3 < mask.width / mask.height < 4  # "AI生成": two Latin letters, two ideographs
    coverage = np.asarray(mask) > 128
    assert 0.15 < coverage.mean() < 0.6
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_asset", os.path.join(ROOT, "scripts",
                                                                             "make_aigc_label_asset.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if not os.path.isfile(script.FONT):
        pytest.skip("fonts-wqy-microhei not installed: the mask cannot be remade here")
    remade = np.asarray(script.render(script.FONT, mask.height), dtype=np.int16)
    assert remade.shape == np.asarray(mask).shape and np.abs(remade - np.asarray(mask)).mean() < 2
    assert zlib.crc32(np.asarray(mask).tobytes()) != 0
