"""The web page in headless Chromium: type a prompt, click, see images (scripts/test.sh installs chromium)."""

import base64

from tests.helpers import InProcessServer, aigc_fields, png, shows_visible_label


def test_type_prompt_click_and_see_images(tiny_model_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = InProcessServer(tiny_model_dir)
    try:
        browser.get(server.url + "/")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("白色背景上有一个红色的圆形")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img")) == 2)
        WebDriverWait(browser, 10).until(ec.text_to_be_present_in_element((By.ID, "status"), "完成"))
        for image in browser.find_elements(By.CSS_SELECTOR, "#images img"):
            src = image.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
            # offered for saving: the visible AIGC label as well as the implicit one
            assert shows_visible_label(png(src.split(",", 1)[1]))
            assert aigc_fields(base64.b64decode(src.split(",", 1)[1]))["Label"] == "1"
        # An error is shown in words: more steps than the service allows.
        steps.clear()
        steps.send_keys("100")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "请求有误"))
        assert "num_inference_steps" in browser.find_element(By.ID, "status").text
    finally:
        server.stop()


def test_with_a_token_the_page_asks_for_it_and_keeps_it_for_the_tab(tiny_model_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = InProcessServer(tiny_model_dir, api_token="s3cret")
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "prompt").send_keys("红色的圆形")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "访问令牌"))
        token = browser.find_element(By.ID, "token")
        assert token.is_displayed()
        token.send_keys("s3cret")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "完成"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 2
        browser.refresh()  # kept for the tab's session
        assert browser.find_element(By.ID, "token").get_attribute("value") == "s3cret"
    finally:
        server.stop()


def test_upload_an_image_paint_a_mask_and_generate(tiny_model_dir, browser, tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(path)
    server = InProcessServer(tiny_model_dir)
    seen, parse = [], server.service.parse
    server.service.parse = lambda body: (seen.append(body), parse(body))[1]
    try:
        browser.get(server.url + "/")
        for control in ("image", "strength", "control", "clear-mask"):
            assert browser.find_element(By.ID, control)
        assert not browser.find_element(By.ID, "mask").is_displayed()  # until an image is uploaded
        browser.find_element(By.ID, "prompt").send_keys("红色的圆形")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "image").send_keys(str(path))
        canvas = browser.find_element(By.ID, "mask")
        WebDriverWait(browser, 10).until(lambda d: canvas.is_displayed() and canvas.get_attribute("width") == "48")
        ActionChains(browser).move_to_element_with_offset(canvas, -40, -30).click_and_hold() \
            .move_by_offset(30, 10).move_by_offset(20, 20).release().perform()
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "完成"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#images img")) == 2
        body = seen[-1]
        assert {"image", "mask", "strength"} <= set(body) and "control_image" not in body
        assert body["image"].startswith("data:image/png;base64,")
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L"))
        assert mask.shape == (40, 48) and mask.max() == 255 and mask.min() == 0  # white strokes on black
        # cleared, no mask is sent: img2img
        browser.find_element(By.ID, "clear-mask").click()
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda d: len(seen) >= 4)
        WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "完成"))
        assert "image" in seen[-1] and "mask" not in seen[-1]
    finally:
        server.stop()
