"""The data sets' command lines: ``make_shapes_dataset.py`` (:func:`main`, of
:func:`shapes_data.generate.generate_dataset`) and ``make_layout_dataset.py`` (:func:`layout_main`, of
:func:`shapes_data.layouts.make_layout_dataset`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

from shapes_data.generate import ALL_SHAPES, STAR, generate_dataset, validate_options
from shapes_data.layouts import make_layout_dataset


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Generate the Chinese shapes text-to-image data set (EasyNLP TSV format).")
    p.add_argument("--output_dir", required=True, help="directory for T2I_*.tsv and *.truth.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_val", type=int, default=1000)
    p.add_argument("--num_test", type=int, default=1000)
    p.add_argument("--num_heldout", type=int, default=500)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--only_shape", default=None, help=f"one of {' '.join(ALL_SHAPES)} (e.g. {STAR} for fine-tuning)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(prog=os.path.basename(sys.argv[0]) if argv is None else "make_shapes_dataset.py")
    args = parser.parse_args(argv)
    try:
        validate_options(args.num_train, args.num_val, args.num_test, args.num_heldout, args.image_size,
                         args.only_shape)
    except ValueError as e:
        parser.error(str(e))
    try:
        written = generate_dataset(args.output_dir, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                   num_test=args.num_test, num_heldout=args.num_heldout, image_size=args.image_size,
                                   only_shape=args.only_shape)
    except OSError as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 1
    for path, rows in written.items():
        print(f"wrote {path} ({rows} rows)")
    return 0


def build_layout_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    # argparse's own error (usage, then the message), as the layout script has always printed
    p = argparse.ArgumentParser(prog=prog, description="Generate the layout-conditioned shapes data set for a "
                                                       "ControlNet (EasyNLP TSV format).")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=8000)
    p.add_argument("--num_val", type=int, default=256)
    p.add_argument("--num_test", type=int, default=150)
    p.add_argument("--image_size", type=int, default=64)
    return p


def layout_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_layout_parser(prog=os.path.basename(sys.argv[0]) if argv is None else "make_layout_dataset.py")
    a = parser.parse_args(argv)
    for path, n in make_layout_dataset(a.output_dir, seed=a.seed, num_train=a.num_train, num_val=a.num_val,
                                       num_test=a.num_test, image_size=a.image_size).items():
        print(f"{path}: {n} rows")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
