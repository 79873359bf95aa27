"""The Chinese shapes text-to-image data set (:mod:`shapes_data.generate`), its layout-conditioned variant for a
ControlNet (:mod:`shapes_data.layouts`), the pixel judge (:mod:`shapes_data.judge`), prompt-following scoring against
the truth sidecars (:mod:`shapes_data.scoring`) and the command lines (:mod:`shapes_data.cli`,
``scripts/make_shapes_dataset.py``, ``scripts/make_layout_dataset.py``).  Not named ``datasets``: that would shadow
Hugging Face's package."""

from shapes_data.generate import (
    ALL_SHAPES,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    STAR,
    ShapeSpec,
    caption,
    generate_dataset,
    parse_caption,
    render,
    sample_spec,
)
from shapes_data.judge import AccuracyCounter, JudgeResult, judge, judge_agreement, judge_details, load_truth

__all__ = [
    "ALL_SHAPES",
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STAR",
    "AccuracyCounter",
    "JudgeResult",
    "ShapeSpec",
    "caption",
    "generate_dataset",
    "judge",
    "judge_agreement",
    "judge_details",
    "load_truth",
    "parse_caption",
    "render",
    "sample_spec",
]
