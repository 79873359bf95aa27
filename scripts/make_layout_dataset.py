#!/usr/bin/env python
"""Generate the layout-conditioned shapes data set for a ControlNet (issue 17, item 5); the generator is
:mod:`shapes_data.layouts`, the command line :func:`shapes_data.cli.layout_main`.

    python scripts/make_layout_dataset.py --output_dir DIR [--seed 0] [--num_train 8000 --num_val 256 --num_test 150] \
        [--image_size 64]

Writes T2I_{train,val}.tsv (idx, text, imgbase64, control), layout_test.tsv (idx, text, control) and a
<table>.truth.jsonl sidecar per table (idx, text, box, colour, shape, spec).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes_data.cli import layout_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(layout_main())
