import os
import shutil

import pytest

from tests.helpers import PROMPTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless Chromium through selenium (the web page's and evaluate's report tests)."""
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are required in CI (scripts/test.sh installs them)")
        pytest.skip("chromium/chromedriver not installed (scripts/test.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """No progress bars in test output."""
    monkeypatch.setenv("EASYNLP_PROGRESS", "0")


@pytest.fixture
def prompts_table(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("".join(f"p{i}\t{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    return str(path)
