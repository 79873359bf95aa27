import pytest

from tests.helpers import PROMPTS


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """No progress bars in test output."""
    monkeypatch.setenv("EASYNLP_PROGRESS", "0")


@pytest.fixture
def prompts_table(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("".join(f"p{i}\t{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    return str(path)
