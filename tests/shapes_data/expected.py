"""What the shapes_data tests expect (written independently of the module's own tables) and readers of its files;
a test utility module, imported by the test modules (fixtures stay in conftest.py)."""

import base64
import io
import json

from PIL import Image

COUNTS = {"num_train": 300, "num_val": 400, "num_test": 200, "num_heldout": 200}
ALL_FILES = {
    "T2I_train.tsv", "T2I_val.tsv", "T2I_test.tsv", "T2I_heldout.tsv", "T2I_heldout_images.tsv",
    "T2I_train.truth.jsonl", "T2I_val.truth.jsonl", "T2I_test.truth.jsonl", "T2I_heldout.truth.jsonl",
}
STAR_FILES = {"T2I_train.tsv", "T2I_val.tsv", "T2I_test.tsv",
              "T2I_train.truth.jsonl", "T2I_val.truth.jsonl", "T2I_test.truth.jsonl"}
# (file, number of columns, truth sidecar, expected rows key)
LAYOUT = [
    ("T2I_train.tsv", 3, "T2I_train.truth.jsonl", "num_train"),
    ("T2I_val.tsv", 3, "T2I_val.truth.jsonl", "num_val"),
    ("T2I_test.tsv", 2, "T2I_test.truth.jsonl", "num_test"),
    ("T2I_heldout.tsv", 2, "T2I_heldout.truth.jsonl", "num_heldout"),
    ("T2I_heldout_images.tsv", 3, "T2I_heldout.truth.jsonl", "num_heldout"),
]
TRUTH_KEYS = {"idx", "text", "colour", "shape", "background", "size", "position", "cx", "cy", "extent", "heldout"}

# Written independently of the module's own phrase tables.
COLOUR_NAMES = ["红色", "绿色", "蓝色", "黄色", "紫色", "橙色"]
SHAPE_NAMES = ["圆形", "正方形", "三角形", "星形"]
BACKGROUND_NAMES = ["白色", "黑色", "灰色"]
POSITION_WORDS = {
    "左上角": "左上", "右上角": "右上", "左下角": "左下", "右下角": "右下",
    "上方": "上方", "顶部": "上方", "下方": "下方", "底部": "下方",
    "左边": "左边", "左侧": "左边", "右边": "右边", "右侧": "右边",
    "正中间": "中间", "中间": "中间", "中央": "中间",
}
GRID = ["左上", "上方", "右上", "左边", "中间", "右边", "左下", "下方", "右下"]


def read_rows(path):
    data = path.read_bytes()
    assert data.endswith(b"\n") or data == b""
    assert b"\r" not in data
    return [line.split("\t") for line in data.decode("utf-8").split("\n")[:-1]]


def read_truth(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decode_png(b64):
    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img
