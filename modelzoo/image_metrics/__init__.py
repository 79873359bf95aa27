"""Image metrics for judging generated images: CLIP score (Chinese-CLIP, AltCLIP, CLIP), a PickScore-style
preference score, the FID Inception-v3 features, FID and KID. Every model comes from a local folder or file."""

from modelzoo.image_metrics.clip_score import ClipScorer
from modelzoo.image_metrics.distances import fid, kid
from modelzoo.image_metrics.inception import InceptionFeatures
from modelzoo.image_metrics.preference import PreferenceScorer

__all__ = ["ClipScorer", "InceptionFeatures", "PreferenceScorer", "fid", "kid"]
