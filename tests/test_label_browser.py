"""The labeling page in a real browser: Debian's headless Chromium driven through
chromium-driver by Selenium (nothing downloaded at run time). It ranks prompts by keyboard
and by dragging, ties and flags completions, reloads mid-way, and checks the rankings file.

Skipped, with the reason, only where no chromium or chromedriver binary is installed
(`apt-get install -y chromium chromium-driver`; .ci/run installs them).
With LABEL_APP_SCREENSHOT=docs/label-app.png it saves the page as the README shows it.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHROME, DRIVER, REPO, headless_chrome

pytestmark = pytest.mark.skipif(not (CHROME and DRIVER), reason="no chromium/chromedriver binary: apt-get install -y chromium chromium-driver")

PROMPTS = [
    ("python_qa/json.dumps", "What does `json.dumps` do?",
     ["Serialize obj to a JSON formatted str.", "It dumps json json json json.", "Return a JSON string of the object, using the\nencoder's options."]),
    ("python_qa/os.path.join", "What is `os.path.join` for?",
     ["Join one or more path segments intelligently.", "A function.", "Joins paths with the separator of the system."]),
    ("python_qa/len", "Explain `len`.", ["Return the number of items in a container.", "len len len", "The length of an object."]),
    ("python_qa/zip", "What does `zip` return?", ["An iterator of tuples.", "", "zip zip"]),
]


@pytest.fixture
def app(tmp_path):
    """The app as a user starts it, on a free 127.0.0.1 port; stopped (that process only) at the end."""
    to_rank = tmp_path / "to_rank.jsonl"
    to_rank.write_text("".join(json.dumps({"id": i, "prompt": p, "completions": c, "finished": [True, True, False], "k": 3}) + "\n"
                               for i, p, c in PROMPTS))
    out = tmp_path / "rankings.jsonl"
    # bob ranked the first prompt already: alice sees their agreement once she has answered
    out.write_text(json.dumps({"id": PROMPTS[0][0], "prompt": PROMPTS[0][1], "completions": PROMPTS[0][2], "ranking": [0, 2, 1],
                               "labeler": "bob"}) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "tasks.label", "--labeler", "alice", "--port", "0", "--to-rank", str(to_rank),
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert m, line + proc.stderr.read()
        yield m.group(0), out
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


@pytest.fixture
def browser(tmp_path):
    driver = headless_chrome(tmp_path / "chrome-profile", "1100,900")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def answers(out: Path, labeler: str = "alice") -> dict:
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines()) if r["labeler"] == labeler}


def test_rank_by_keyboard_and_drag_reload_and_resume(app, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, out = app
    wait = WebDriverWait(browser, 15)
    text = lambda el_id: browser.find_element(By.ID, el_id).text  # noqa: E731
    order = lambda: [int(li.get_attribute("data-index")) for li in browser.find_elements(By.CSS_SELECTOR, "#completions .card")]  # noqa: E731

    def showing(prompt_id):
        wait.until(lambda d: text("prompt-id") == prompt_id)

    def keys(*seq):
        ActionChains(browser).send_keys(*seq).perform()

    browser.get(url)
    showing(PROMPTS[0][0])
    assert text("prompt") == PROMPTS[0][1] and (text("done"), text("left"), text("total")) == ("0", "4", "4")
    assert text("labeler") == "alice" and "no prompt ranked by two people" in text("agreement")
    assert "never ended its turn" in browser.find_elements(By.CSS_SELECTOR, "#completions .card")[2].text

    # prompt 1 by keyboard: pick the 3rd, move it up twice, flag the one now last, save
    keys("3", Keys.ARROW_UP, Keys.ARROW_UP)
    assert order() == [2, 0, 1]
    keys("3", "f", Keys.ENTER)
    showing(PROMPTS[1][0])
    assert (text("done"), text("left")) == ("1", "3")
    first = answers(out)[PROMPTS[0][0]]
    assert (first["ranking"], first["flagged"], first["ties"]) == ([2, 0, 1], [1], [])
    assert "agreement 0.00 on 1 pair(s) of 1 shared prompt" in text("agreement")  # bob: 0 > 2, alice: 2 > 0 (1 is flagged)

    # prompt 2 by dragging: the last card onto the top half of the first, then tie the 2nd with the 1st (button)
    cards = browser.find_elements(By.CSS_SELECTOR, "#completions .card")
    ActionChains(browser).click_and_hold(cards[2].find_element(By.CSS_SELECTOR, ".rank")).move_by_offset(0, -10) \
        .move_to_element_with_offset(cards[0], 0, -cards[0].size["height"] // 2 + 3).release().perform()
    assert order() == [2, 0, 1]
    browser.find_elements(By.CSS_SELECTOR, "#completions .card")[1].find_element(By.CSS_SELECTOR, "button.tie").click()
    assert [c.find_element(By.CSS_SELECTOR, ".rank").text for c in browser.find_elements(By.CSS_SELECTOR, "#completions .card")] == ["1", "1", "3"]
    browser.find_element(By.ID, "save").click()
    showing(PROMPTS[2][0])
    second = answers(out)[PROMPTS[1][0]]
    assert (second["ranking"], second["ties"], second["flagged"]) == ([2, 0, 1], [[2, 0]], [])

    # reload mid-way: the page resumes at the first prompt alice has not ranked, nothing lost
    browser.refresh()
    showing(PROMPTS[2][0])
    assert (text("done"), text("left")) == ("2", "2") and len(answers(out)) == 2
    if os.environ.get("LABEL_APP_SCREENSHOT"):  # the README's picture: a ranking in progress
        keys("3", Keys.ARROW_UP, "2", "t", "3", "f")
        browser.set_window_size(1000, 720)
        browser.save_screenshot(os.environ["LABEL_APP_SCREENSHOT"])
        keys("3", "f", "2", "t", "3", Keys.ARROW_UP)  # back to the order as loaded
        assert order() == [0, 1, 2]
    keys(Keys.ENTER)  # the order as shown
    showing(PROMPTS[3][0])
    keys(Keys.ARROW_LEFT)  # browse back: the saved answer is shown, and saving replaces it
    showing(PROMPTS[2][0])
    assert "ranked by you" in text("item-status")
    keys("2", "f", Keys.ENTER)
    showing(PROMPTS[3][0])
    keys(Keys.ENTER)
    wait.until(lambda d: "All 4 prompts ranked" in text("notice"))
    assert (text("done"), text("left")) == ("4", "0")
    final = answers(out)
    assert len(final) == 4 and final[PROMPTS[2][0]]["ranking"] == [0, 1, 2] and final[PROMPTS[2][0]]["flagged"] == [1]
    assert final[PROMPTS[3][0]]["ranking"] == [0, 1, 2]
    assert answers(out, "bob")[PROMPTS[0][0]]["ranking"] == [0, 2, 1]  # the other labeler's answer is untouched


def test_a_rejected_answer_shows_the_error_on_the_page(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, out = app
    browser.get(url)
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    before = out.read_bytes()
    # the page's own save, given an order that is not a permutation (as a buggy page would send)
    browser.execute_script("order = [0, 0, 1]; document.getElementById('save').click();")
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "Not saved: 'ranking' must order all 3 completions" in browser.find_element(By.ID, "error").text
    assert out.read_bytes() == before
