"""Create a randomly initialised model (this toolkit's checkpoint layout) from a preset, with a Chinese character
vocabulary: every character of the training captions plus GB2312's 3 755 level-1 characters (so characters unseen in
training are not all [UNK]), ASCII letters and digits, and common punctuation.

    python scripts/init_model.py --preset configs/shapes_ldm_small.json --captions data/T2I_train.tsv --output DIR
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = "，。、；：？！“”‘’（）《》…—·,.;:?!()[]'\"-+/%"


def gb2312_level1() -> list[str]:
    chars = []
    for high in range(0xB0, 0xD8):
        for low in range(0xA1, 0xFF):
            try:
                chars.append(bytes([high, low]).decode("gb2312"))
            except UnicodeDecodeError:
                pass  # the five unassigned code points at the end of row 0xD7
    return chars


def build_vocab(caption_files: list[str]) -> list[str]:
    seen = dict.fromkeys(SPECIAL)
    for path in caption_files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                cells = line.rstrip("\n").split("\t")
                if len(cells) >= 2:
                    for ch in cells[1].lower():
                        if not ch.isspace():
                            seen.setdefault(ch)
    for ch in gb2312_level1() + list("abcdefghijklmnopqrstuvwxyz0123456789") + list(PUNCTUATION):
        seen.setdefault(ch)
    return list(seen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--captions", nargs="+", required=True, help="TSV files whose second column is a caption")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from easynlp_ldm.files import atomic_write_text
    from modelzoo.families import sd
    from modelzoo.presets import build_from_preset

    os.makedirs(args.output, exist_ok=True)
    vocab_path = os.path.join(args.output, "vocab.txt")
    vocab = build_vocab(args.captions)
    atomic_write_text(vocab_path, "".join(token + "\n" for token in vocab))
    model = build_from_preset(args.preset, vocab_path, seed=args.seed)
    sd.save(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"initialised {args.output}: vocabulary {len(vocab)}, {params / 1e6:.2f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
