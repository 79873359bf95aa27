import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenVINO IRs converted by the tests (optimize=auto on CPU) go to one folder per run, shared by the subprocesses the
# tests start (identical tiny models convert once), never to the user's ~/.cache.
if "EASYNLP_OPENVINO_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["EASYNLP_OPENVINO_CACHE"] = tempfile.mkdtemp(prefix="easynlp-openvino-test-")
    atexit.register(shutil.rmtree, os.environ["EASYNLP_OPENVINO_CACHE"], True)
# diffusers copies a folder's own code (trust_remote_code: the Wukong text encoder of an exported EasyNLP model) into
# its modules cache: a folder of this run's, never the user's ~/.cache/huggingface/modules.
if "HF_MODULES_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="easynlp-hf-modules-test-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)


# The test suite's second model family (tests/modelzoo/toy_family.py), registered here and nowhere else.
from modelzoo import families  # noqa: E402

families.register("toy-flow", "tests.modelzoo.toy_family:FAMILY")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model in PAI's diffusers layout (.bin weights), at the path PAI's tutorial names."""
    from modelzoo.tiny import make_tiny_diffusers_model

    root = tmp_path_factory.mktemp("models")
    folder = root / "alibaba-pai" / "pai-diffusion-general-large-zh"
    make_tiny_diffusers_model(str(folder), image_size=32)
    return str(folder)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from shapes_data import generate_dataset

    folder = tmp_path_factory.mktemp("shapes")
    generate_dataset(str(folder), seed=0, num_train=32, num_val=8, num_test=6, num_heldout=4, image_size=32)
    return str(folder)
