"""Session-scoped data sets for the shapes_data tests (generated once for both modules)."""

import pytest

from shapes_data import generate_dataset
from tests.shapes_data.expected import COUNTS


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(str(out), seed=0, image_size=64, **COUNTS)
    return out


@pytest.fixture(scope="session")
def star_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("stars")
    generate_dataset(str(out), seed=0, num_train=200, num_val=200, num_test=50, image_size=64, only_shape="星形")
    return out
