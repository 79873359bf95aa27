"""The image metrics (modelzoo/image_metrics/) against torchmetrics and hand computations, on tiny random models built
offline (modelzoo/tiny_metrics.py)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easynlp_ldm.errors import UserError
from modelzoo.image_metrics import ClipScorer, InceptionFeatures, PreferenceScorer, fid, kid
from modelzoo.image_metrics.inception import images_to_tensor
from modelzoo.tiny_metrics import make_tiny_clip, make_tiny_inception
from tests.helpers import PROMPTS, photo

IMAGES = [photo(seed) for seed in range(len(PROMPTS))]
# A seed whose random Chinese-CLIP gives these pairs positive cosines, so the floor at 0 hides no comparison.
CHINESE_CLIP_SEED = 4

# torchvision's Inception3 module names, which pytorch-fid's fid_inception_v3 keeps (its FIDInception* blocks subclass
# torchvision's), so that pt_inception-2015-12-05-6726825d.pth loads: written from torchvision/models/inception.py.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3",
      "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
PYTORCH_FID_CONVS = (["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
                     + [f"{block}.{name}" for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for name in _A]
                     + [f"Mixed_6a.{name}" for name in _B]
                     + [f"{block}.{name}" for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for name in _C]
                     + [f"Mixed_7a.{name}" for name in _D]
                     + [f"{block}.{name}" for block in ("Mixed_7b", "Mixed_7c") for name in _E])
PYTORCH_FID_KEYS = ({f"{conv}.conv.weight" for conv in PYTORCH_FID_CONVS}
                    | {f"{conv}.bn.{name}" for conv in PYTORCH_FID_CONVS
                       for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
                    | {"fc.weight", "fc.bias"})


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return {kind: make_tiny_clip(str(root / kind), kind, seed=CHINESE_CLIP_SEED if kind == "chinese_clip" else 0)
            for kind in ("chinese_clip", "altclip", "clip")}


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return make_tiny_inception(str(tmp_path_factory.mktemp("inception") / "pt_inception-tiny.pth"))


@pytest.fixture(scope="module")
def inception(inception_weights):
    return InceptionFeatures(inception_weights)


class TorchmetricsExtractor(torch.nn.Module):
    """InceptionFeatures as torchmetrics' ``feature=`` module: uint8 [N, 3, H, W] in, float64 features out (the
    default convention of FrechetInceptionDistance / KernelInceptionDistance, normalize=False); ``width`` keeps the
    first features only."""

    def __init__(self, features: InceptionFeatures, width: int | None = None):
        super().__init__()
        self.features = features
        self.width = width

    def forward(self, images):
        return self.features.features_of_tensor(images.float() / 255)[:, :self.width]


def uint8_batch(images):
    return (images_to_tensor(images) * 255).round().to(torch.uint8)


# --- CLIP score ---

def test_clip_score_equals_torchmetrics_clipscore(clip_dirs):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import AutoProcessor, CLIPModel

    class TensorFeaturesCLIPModel(CLIPModel):
        """transformers 5 returns the projected features as ``pooler_output`` of an output object; torchmetrics 1.9
        expects the tensor transformers 4 returned."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    folder = clip_dirs["clip"]
    ours = ClipScorer(folder)(IMAGES, PROMPTS)
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeaturesCLIPModel.from_pretrained(folder),
                                                   AutoProcessor.from_pretrained(folder)))
    expected = []
    for image, prompt in zip(IMAGES, PROMPTS):
        metric.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt)
        expected.append(float(metric.compute()))
        metric.reset()
    assert any(score > 0 for score in expected)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["chinese_clip", "altclip"])
def test_clip_score_equals_a_hand_computation_from_the_models_own_features(clip_dirs, kind):
    import transformers

    folder = clip_dirs[kind]
    model = getattr(transformers, {"chinese_clip": "ChineseCLIPModel", "altclip": "AltCLIPModel"}[kind])
    model = model.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=IMAGES, return_tensors="pt").pixel_values
        images = model.get_image_features(pixel_values=pixels).pooler_output
        texts = model.get_text_features(**processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    cosines = torch.nn.functional.cosine_similarity(images.double(), texts.double(), dim=-1)
    expected = (100 * cosines).clamp(min=0).tolist()
    assert all(score > 0 for score in expected) if kind == "chinese_clip" else any(score > 0 for score in expected)
    np.testing.assert_allclose(ClipScorer(folder)(IMAGES, PROMPTS), expected, atol=1e-4, rtol=0)


def test_clip_score_truncates_long_prompts_to_the_models_length(clip_dirs):
    scorer = ClipScorer(clip_dirs["chinese_clip"])
    assert len(scorer(IMAGES[:1], [PROMPTS[0] * 200])) == 1


def test_preference_score_is_logit_scale_times_cosine(clip_dirs):
    from transformers import CLIPModel

    folder = clip_dirs["clip"]
    model = CLIPModel.from_pretrained(folder)
    clip = ClipScorer(folder)(IMAGES, PROMPTS)  # 100 × cos where positive
    preference = PreferenceScorer(folder)(IMAGES, PROMPTS)
    scale = float(model.logit_scale.detach().exp())
    for clip_score, score in zip(clip, preference):
        if clip_score > 0:
            assert score == pytest.approx(scale * clip_score / 100, rel=1e-6)


def test_a_checkpoint_without_processor_files_takes_them_from_another_folder(clip_dirs, tmp_path):
    folder = clip_dirs["clip"]
    weights_only = tmp_path / "pickscore"
    weights_only.mkdir()
    for name in os.listdir(folder):
        if name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(folder, name), weights_only / name)
    with pytest.raises(UserError, match="pickscore: no processor in .*copy them"):
        PreferenceScorer(str(weights_only))
    assert (PreferenceScorer(str(weights_only), processor=folder)(IMAGES, PROMPTS)
            == PreferenceScorer(folder)(IMAGES, PROMPTS))


def test_clip_folders_users_get_wrong_are_one_line_user_errors(clip_dirs, tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        ClipScorer(str(tmp_path / "missing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="not a CLIP-style model"):
        ClipScorer(str(tmp_path / "bert"))
    with pytest.raises(UserError, match="preference_model=.*CLIPModel"):
        PreferenceScorer(clip_dirs["chinese_clip"])


# --- FID Inception ---

def test_the_tiny_inception_has_pytorch_fids_state_dict_layout(inception_weights):
    state = torch.load(inception_weights, weights_only=True)
    assert set(state) == PYTORCH_FID_KEYS
    assert len(state) == 566
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)


def test_inception_features_from_pth_safetensors_and_legacy_files_agree(inception, inception_weights, tmp_path):
    images = IMAGES[:2]
    features = inception(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.abs(features[0] - features[1]).mean() > 1e-3  # the calibrated random network tells images apart
    state = torch.load(inception_weights, weights_only=True)
    save_file(state, str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(InceptionFeatures(str(tmp_path / "w.safetensors"))(images), features)
    # Files saved before torch 0.4.1 have no BatchNorm counters.
    legacy = {name: tensor for name, tensor in state.items() if not name.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / "legacy.pth")
    np.testing.assert_array_equal(InceptionFeatures(str(tmp_path / "legacy.pth"))(images), features)
    # Mixed sizes are batched by size; each image's features do not depend on its neighbours.
    mixed = [images[0], photo(9, (48, 40)), images[1]]
    np.testing.assert_allclose(inception(mixed)[[0, 2]], features, rtol=1e-5, atol=1e-6)


def test_inception_weights_users_get_wrong_are_one_line_user_errors(inception_weights, tmp_path):
    with pytest.raises(UserError, match="missing.pth: file not found; download .*pt_inception"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: not the FID Inception-v3 state dict"):
        InceptionFeatures(str(tmp_path / "other.pth"))
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(UserError, match="shape.pth: 1 tensors have the wrong shape"):
        InceptionFeatures(str(tmp_path / "shape.pth"))
    (tmp_path / "pickle.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="pickle.pth: cannot read weights safely"):
        InceptionFeatures(str(tmp_path / "pickle.pth"))


# --- FID and KID ---

def reference_fid(real, fake):
    """The closed form with symmetric eigendecompositions (no scipy.linalg.sqrtm): Tr √(Σ₁Σ₂) = Tr √(√Σ₁ Σ₂ √Σ₁)."""
    mean_real, mean_fake = real.mean(0), fake.mean(0)
    cov_real, cov_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    values, vectors = np.linalg.eigh(cov_real)
    root_real = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(root_real @ cov_fake @ root_real), 0, None)).sum()
    return float(((mean_real - mean_fake) ** 2).sum() + np.trace(cov_real) + np.trace(cov_fake) - 2 * root_trace)


@pytest.mark.parametrize("samples", [(12, 9), (300, 200)])  # fewer images than features, then more
def test_fid_equals_the_reference_formula(samples):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(samples[0], 64)) @ rng.normal(size=(64, 64))
    fake = rng.normal(0.3, 1.2, size=(samples[1], 64)) @ rng.normal(size=(64, 64))
    assert fid(real, fake) == pytest.approx(reference_fid(real, fake), rel=1e-6)
    assert abs(fid(real, real)) <= 1e-9 * np.trace(np.cov(real, rowvar=False))


def test_fid_and_kid_of_inception_features_equal_torchmetrics(inception):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_images, fake_images = IMAGES[:4], [photo(seed + 100) for seed in range(4)]
    real, fake = inception(real_images), inception(fake_images)
    assert abs(fid(real, real)) <= 1e-9 * np.trace(np.cov(real, rowvar=False))

    # torchmetrics' FID runs a general eigendecomposition of the 2048² product (about a minute on two cores): it
    # is given the first 256 features, the same network.
    width = 256
    metric = FrechetInceptionDistance(feature=TorchmetricsExtractor(inception, width))
    metric.update(uint8_batch(real_images), real=True)
    metric.update(uint8_batch(fake_images), real=False)
    assert fid(real[:, :width], fake[:, :width]) == pytest.approx(float(metric.compute()), rel=1e-4)

    subsets, subset_size, seed = 5, 3, 3
    metric = KernelInceptionDistance(feature=TorchmetricsExtractor(inception), subsets=subsets,
                                     subset_size=subset_size)
    metric.update(uint8_batch(real_images), real=True)
    metric.update(uint8_batch(fake_images), real=False)
    torch.manual_seed(seed)  # torchmetrics draws its subsets from the global generator
    expected_mean, expected_std = (float(value) for value in metric.compute())
    mean, std = kid(real, fake, subsets=subsets, subset_size=subset_size, seed=seed)
    assert std > 0
    assert mean == pytest.approx(expected_mean, rel=1e-6) and std == pytest.approx(expected_std, rel=1e-6)


def test_kid_caps_the_subset_size_and_refuses_too_few_images():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    assert kid(real, fake, subsets=3) == kid(real, fake, subsets=3, subset_size=5)
    with pytest.raises(UserError, match="at least 2 images"):
        kid(real[:1], fake)
    with pytest.raises(UserError, match="at least 2 images"):
        fid(real, fake[:1])


def test_kid_matches_an_explicit_unbiased_mmd_over_all_samples():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(6, 4)), rng.normal(0.5, 1, size=(6, 4))
    kernel = lambda x, y: (x @ y.T / 4 + 1) ** 3  # noqa: E731
    m = len(real)
    k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    expected = ((k_rr.sum() - np.trace(k_rr)) + (k_ff.sum() - np.trace(k_ff))) / (m * (m - 1)) - 2 * k_rf.mean()
    mean, std = kid(real, fake, subsets=4, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-9) and std == pytest.approx(0, abs=1e-12)
