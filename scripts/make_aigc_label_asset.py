"""Render the visible AIGC label "AI生成" once into easynlp_ldm/assets/aigc_label.png, so no CJK font is needed
when the label is drawn (easynlp_ldm/aigc.py scales this mask with Pillow).

The glyphs come from WenQuanYi Micro Hei (Debian's fonts-wqy-microhei; Apache-2.0 or GPL-3+ with the font
exception, the copyright file in /usr/share/doc/fonts-wqy-microhei/): ``apt-get install fonts-wqy-microhei``, then

    python scripts/make_aigc_label_asset.py [--font PATH] [--height PX]

The mask is 8-bit grayscale, white glyph coverage on black, cropped to the ink, ``--height`` pixels tall (96 by
default: sharp when scaled down for any image up to about 1900 px on its short side, and a few KB).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from easynlp_ldm.aigc import VISIBLE_TEXT  # noqa: E402
from easynlp_ldm.files import atomic_write_bytes  # noqa: E402

FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
ASSET = os.path.join(ROOT, "easynlp_ldm", "assets", "aigc_label.png")


def render(font_path: str, height: int) -> Image.Image:
    """``VISIBLE_TEXT`` as a grayscale coverage mask exactly ``height`` pixels tall, cropped to its ink."""
    # Render large, crop to the ink, then scale to the height: the mask's height is the glyphs' own, not the font's
    # line height with its empty ascent and descent.
    font = ImageFont.truetype(font_path, size=height * 4)
    left, top, right, bottom = font.getbbox(VISIBLE_TEXT)
    canvas = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), VISIBLE_TEXT, fill=255, font=font)
    ink = canvas.crop(canvas.getbbox())
    width = round(ink.width * height / ink.height)
    return ink.resize((width, height), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--font", default=FONT, help=f"a font file with Latin and CJK glyphs (default: {FONT})")
    parser.add_argument("--height", type=int, default=96, help="mask height in pixels")
    parser.add_argument("--output", default=ASSET, help="where the PNG goes")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.font):
        parser.error(f"no font at {args.font}: apt-get install fonts-wqy-microhei, or give --font")
    buffer = io.BytesIO()
    render(args.font, args.height).save(buffer, format="PNG", optimize=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    atomic_write_bytes(args.output, buffer.getvalue())
    print(f"wrote {args.output} ({len(buffer.getvalue())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
