"""The FID Inception-v3 (pool3, 2048 features) without torchvision, loading the weights file users already have.

The reference is pytorch-fid 0.3.0 (``pytorch_fid/inception.py``): torchvision's ``Inception3`` with 1008 classes
and no auxiliary head, patched by ``FIDInceptionA/C/E_1/E_2`` (average pools that ignore the padding, a max pool in
the last block) to reproduce TensorFlow's graph, loaded from ``pt_inception-2015-12-05-6726825d.pth``. The module
names below are torchvision's, so that file's state dict loads key for key; images are resized to 299×299
bilinearly (``align_corners=False``) from [0, 1] and mapped to [-1, 1], as pytorch-fid's ``InceptionV3`` does.

No library offers this network without torchvision (which this toolkit does not depend on): pytorch-fid and
clean-fid import torchvision, and ``torch_fidelity.feature_extractor_inceptionv3``, torchvision-free itself, is
reached only through ``torch_fidelity/__init__.py``, which imports its CLIP and VGG extractors and so torchvision; it
also loads its weights with ``weights_only=False``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from easynlp_ldm.errors import UserError
from easynlp_ldm.files import WeightsError, load_state_dict_file

FEATURES = 2048
INPUT_SIZE = 299
WEIGHTS_HINT = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/"
                "releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)")


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x):
    # TensorFlow's average pool leaves the padded zeros out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool`` picks the FID network's patch: its last block pools by maximum where the paper averages."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3()`` up to the final average pool (its ``fc`` is kept only so that the weights
    file loads strictly); ``forward`` takes images in [0, 1] of any size and returns [N, 2048] pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, output_size=(1, 1)), 1)


def _comparable_keys(names) -> set[str]:
    # Files written before torch 0.4.1 have no BatchNorm counters; they carry no weights, so both forms load.
    return {name for name in names if not name.endswith("num_batches_tracked")}


def load_fid_inception(weights: str) -> FIDInceptionV3:
    """The network from a local ``.pth`` (read with ``weights_only=True``) or ``.safetensors`` file in pytorch-fid's
    key layout; a missing file or another layout is a ``UserError`` naming the file."""
    if not os.path.isfile(weights):
        raise UserError(f"fid_weights={weights}: file not found; download {WEIGHTS_HINT} and pass its path")
    try:
        state = load_state_dict_file(weights)
    except WeightsError as err:
        raise UserError(f"fid_weights={err}") from None
    network = FIDInceptionV3()
    expected = _comparable_keys(network.state_dict())
    found = _comparable_keys(state)
    if found != expected:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise UserError(f"fid_weights={weights}: not the FID Inception-v3 state dict ({len(missing)} keys missing, "
                        f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); use {WEIGHTS_HINT}")
    shapes = network.state_dict()
    wrong = [name for name in expected if tuple(state[name].shape) != tuple(shapes[name].shape)]
    if wrong:
        first = wrong[0]
        raise UserError(f"fid_weights={weights}: {len(wrong)} tensors have the wrong shape (e.g. {first}: "
                        f"{tuple(state[first].shape)}, expected {tuple(shapes[first].shape)}); use {WEIGHTS_HINT}")
    network.load_state_dict(state, strict=False)
    return network.eval().requires_grad_(False)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB float32 [N, 3, H, W] in [0, 1], as torchvision's ``ToTensor`` makes them for pytorch-fid; images of
    different sizes are fine one at a time, so a batch must share one size."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


class InceptionFeatures:
    """``InceptionFeatures(weights)(images) -> [N, 2048] float64``: pool3 features of the FID network for a list
    of PIL images (any sizes; each is resized to 299×299 in the network, as pytorch-fid does)."""

    def __init__(self, weights: str, *, device: str | torch.device = "cpu", batch_size: int = 32):
        self.weights = weights
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = load_fid_inception(weights).to(self.device)

    @torch.inference_mode()
    def features_of_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a float [N, 3, H, W] batch in [0, 1] (float64 on the CPU)."""
        return self.network(images.to(self.device, torch.float32)).double().cpu()

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, FEATURES), dtype=np.float64)
        parts = []
        start = 0
        while start < len(images):
            batch = [images[start]]
            # A batch is consecutive images of one size; the network resizes each to 299×299 anyway.
            while (len(batch) < self.batch_size and start + len(batch) < len(images)
                   and images[start + len(batch)].size == batch[0].size):
                batch.append(images[start + len(batch)])
            parts.append(self.features_of_tensor(images_to_tensor(batch)))
            start += len(batch)
        return torch.cat(parts).numpy()
