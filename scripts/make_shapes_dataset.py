#!/usr/bin/env python
"""Generate the Chinese shapes text-to-image data set in EasyNLP TSV format.

    python scripts/make_shapes_dataset.py --output_dir tmp/shapes [--seed 0] \
        [--num_train 20000 --num_val 1000 --num_test 1000 --num_heldout 500] \
        [--image_size 64] [--only_shape 星形]

Writes T2I_{train,val}.tsv (idx, text, imgbase64), T2I_{test,heldout}.tsv (idx, text),
T2I_heldout_images.tsv (idx, text, imgbase64) and a <split>.truth.jsonl sidecar per split.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes_data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
