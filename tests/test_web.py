"""The inspection page and report.html, driven in a real headless Chromium against a real server.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the `[test]` extra); without a
browser the browser tests skip with a message saying what to install (or fail, with
ANOMALYVFM_REQUIRE_BROWSER=1, as CI should set). Set ANOMALYVFM_DOCS_SCREENSHOTS=1
to also write the screenshots under docs/ (docs/inspection-page.png, docs/report-html.png).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from anomalyvfm.cli.main import main
from anomalyvfm.evaluation.html_report import INDEX_NAME, REPORT_NAME
from anomalyvfm.service.app import create_app
from anomalyvfm.store import open_store
from servers import LIMITS, MAX_BYTES, close, live_server

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1366,768", "--hide-scrollbars")
WAIT_S = 30


def find_browser() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile and the browser console log kept."""
    found = find_browser()
    if found is None:
        missing = "no Chromium to drive: apt-get install -y chromium chromium-driver"
        if os.environ.get("ANOMALYVFM_REQUIRE_BROWSER"):  # CI sets it: a missing browser must not pass as a skip
            pytest.fail(missing)
        pytest.skip(missing)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))  # no driver download
    # the viewport itself 1366x768, the shop-floor screen the page is laid out for
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def url(fitted_model) -> Iterator[str]:
    with live_server(create_app(fitted_model, limits=LIMITS), LIMITS) as base:
        yield base


@pytest.fixture(scope="module")
def images(data_root, tmp_path_factory) -> dict[str, Path]:
    """Test images under camera-style names, so the page cannot tell good from bad by the file name."""
    test, folder = data_root / "demo" / "test_public", tmp_path_factory.mktemp("camera")
    picked = {"bad": test / "bad" / "000_regular.png", "good": test / "good" / "000_regular.png",
              "bad2": test / "bad" / "001_regular.png", "good2": test / "good" / "001_regular.png"}
    for number, (key, source) in enumerate(picked.items(), start=1041):
        picked[key] = folder / f"cam2-part{number}.png"
        shutil.copyfile(source, picked[key])
    return picked


def wait_for(driver, condition: Callable[[], object], what: str):
    """Poll `condition` until it is truthy; fail naming `what` and the page's message if it never is.

    An element the page re-rendered between finding it and reading it (stale) is polled again, not a failure:
    on a busy machine a history refresh can replace a row inside one check (seen: one run in three).
    """
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05,
                             ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
                             ).until(lambda _: condition())
    except Exception:
        message = driver.execute_script("return document.getElementById('message')?.innerText")
        pytest.fail(f"page never showed {what}; page message: {message!r}")


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    driver.get_log("browser")  # start each test's console record empty


def page_ready(driver) -> None:
    wait_for(driver, lambda: by_id(driver, "card").find_elements("css selector", "dd[data-field=backbone]"),
             "the model card")


def upload(driver, *paths: Path) -> None:
    by_id(driver, "file-input").send_keys("\n".join(str(p) for p in paths))


def results(driver) -> int:
    return len(driver.find_elements("css selector", "#history tbody tr"))


def api_answer(base: str, path: Path, **headers: str) -> dict:
    response = requests.post(base + "/predict", params={"maps": "true"}, headers=headers, timeout=60,
                             files={"file": (path.name, path.read_bytes(), "image/png")})
    response.raise_for_status()
    return response.json()


def outline_pixels(mask: np.ndarray) -> int:
    """Pixels the page must draw as the outline of a 0/255 mask: inside, with a 4-neighbour outside (1 px wide)."""
    inside = np.pad(mask > 127, 1)
    core = inside[1:-1, 1:-1]
    return int((core & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])).sum())


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(fragment in entry["message"] for fragment in allowed)]


def screenshot(driver, path: Path, docs: bool = True) -> np.ndarray:
    """Save a PNG of the window (and a copy under docs/ when asked); return its pixels."""
    driver.save_screenshot(str(path))
    if docs and os.environ.get("ANOMALYVFM_DOCS_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / path.name)
    return np.asarray(Image.open(path).convert("RGB"))


def test_upload_shows_the_apis_verdict_heat_map_and_outline(browser, url, images, tmp_path):
    open_page(browser, url)
    page_ready(browser)
    upload(browser, images["bad"])
    wait_for(browser, lambda: results(browser) == 1, "the first result")
    expected = api_answer(url, images["bad"])
    assert by_id(browser, "verdict").get_attribute("data-verdict") == "FAIL" and expected["is_anomalous"]
    assert "fail" in by_id(browser, "verdict").get_attribute("class")
    row = browser.find_element("css selector", "#history tbody tr")
    assert close(float(row.get_attribute("data-score")), expected["score"])
    assert by_id(browser, "view-heat").get_attribute("src") == "data:image/png;base64," + expected["anomaly_map_png"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(expected["mask_png"]))))
    edges = int(wait_for(browser, lambda: by_id(browser, "view-outline").get_attribute("data-edges"), "the outline"))
    assert mask.any() and edges == outline_pixels(mask)
    assert by_id(browser, "view-heat").is_displayed() and by_id(browser, "view-image").is_displayed()

    upload(browser, images["good"], images["bad2"], images["good2"])  # several at once, checked in turn
    wait_for(browser, lambda: results(browser) == 4, "four results")
    scores = {p: api_answer(url, images[p])["score"] for p in ("good", "bad2", "good2")}
    verdicts = [browser.execute_script("return arguments[0].cells[3].innerText", r)
                for r in browser.find_elements("css selector", "#history tbody tr")]
    assert verdicts == ["PASS", "FAIL", "PASS", "FAIL"]  # newest first: good2, bad2, good, bad

    # Sorting by score, from the keyboard: Enter on the focused header button.
    sort = by_id(browser, "sort-score")
    sort.send_keys("\n")
    shown = [float(r.get_attribute("data-score")) for r in browser.find_elements("css selector", "#history tbody tr")]
    assert shown == sorted(shown, reverse=True) and by_id(browser, "score-col").get_attribute("aria-sort") == "descending"

    # What-if: a threshold between the two defective scores passes one of them; the model is untouched.
    whatif = (expected["score"] + scores["bad2"]) / 2
    field = by_id(browser, "whatif-number")
    field.clear()
    field.send_keys(f"{whatif}\t")
    all_scores = [expected["score"], *scores.values()]
    summary = wait_for(browser, lambda: "would fail" in by_id(browser, "whatif-summary").text and
                       by_id(browser, "whatif-summary").text, "the what-if summary")
    assert f"{sum(s > whatif for s in all_scores)} of 4 would fail" in summary
    changed = browser.find_elements("css selector", "#history tbody tr.changed")
    assert len(changed) == sum((s > whatif) != (s > expected["threshold"]) for s in all_scores) >= 1
    assert api_answer(url, images["bad"])["threshold"] == expected["threshold"]  # client-side only

    # Back to the highest-scoring image from the keyboard: its file-name button in the sorted history.
    top = browser.find_element("css selector", "#history tbody tr:first-child .pick")
    name = top.text
    top.send_keys("\n")
    wait_for(browser, lambda: by_id(browser, "result-file").text == name, "the picked result")
    assert by_id(browser, "verdict").get_attribute("data-verdict") == "FAIL"
    assert browser.execute_script("return document.activeElement.textContent") == name  # focus kept on the row
    assert not console_errors(browser)
    pixels = screenshot(browser, tmp_path / "inspection-page.png")
    assert pixels.std() > 10


def test_a_dropped_image_is_checked(browser, url, images):
    open_page(browser, url)
    page_ready(browser)
    body = browser.find_element("tag name", "body")
    body.send_keys("\t")  # the skip link first, then the file chooser: reachable from the keyboard
    browser.switch_to.active_element.send_keys("\t")
    assert browser.switch_to.active_element.get_attribute("id") == "file-input"
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, base64.b64encode(images["bad"].read_bytes()).decode())
    wait_for(browser, lambda: results(browser) == 1, "the dropped image's result")
    assert by_id(browser, "result-file").text == "dropped.png"
    assert by_id(browser, "verdict").get_attribute("data-verdict") == "FAIL"


def test_bad_files_show_the_servers_message_and_the_page_goes_on(browser, url, images, tmp_path):
    open_page(browser, url)
    page_ready(browser)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    upload(browser, junk)
    wait_for(browser, lambda: by_id(browser, "message").is_displayed(), "an error message")
    text = by_id(browser, "message-text").text
    detail = requests.post(url + "/predict", files={"file": ("junk.png", junk.read_bytes(), "image/png")}, timeout=60)
    assert detail.status_code == 422 and detail.json()["detail"] in text and "HTTP 422" in text
    assert by_id(browser, "verdict").text == "NOT CHECKED"

    big = tmp_path / "big.png"
    big.write_bytes(images["good"].read_bytes() + bytes(MAX_BYTES))  # over the server's byte limit
    upload(browser, big)
    wait_for(browser, lambda: "big.png" in by_id(browser, "message-text").text, "the size message")
    assert "over the server's limit" in by_id(browser, "message-text").text

    upload(browser, images["good"])  # the page still works after both refusals
    wait_for(browser, lambda: results(browser) == 3, "a result after the errors")
    assert by_id(browser, "verdict").get_attribute("data-verdict") == "PASS"
    assert not console_errors(browser, allowed=("status of 422",))


def test_api_key_is_asked_once_and_sent_as_header(browser, fitted_model, images):
    with live_server(create_app(fitted_model, api_key="s3cret")) as base:
        open_page(browser, base)
        dialog = by_id(browser, "key-dialog")
        wait_for(browser, lambda: dialog.get_attribute("open") is not None, "the API-key dialog")
        upload(browser, images["bad"])  # meets a 401 too while the dialog is open: it waits for the same key
        by_id(browser, "key-input").send_keys("wrong\n")
        wait_for(browser, lambda: "refused" in by_id(browser, "key-reason").text, "the wrong-key message")
        by_id(browser, "key-input").send_keys("s3cret\n")
        page_ready(browser)
        wait_for(browser, lambda: results(browser) == 1, "the result of the image sent before the key")
        upload(browser, images["good"])
        wait_for(browser, lambda: results(browser) == 2, "two results")
        assert dialog.get_attribute("open") is None  # not asked again for the uploads
        expected = api_answer(base, images["bad"], **{"X-API-Key": "s3cret"})
        row = browser.find_element("css selector", "#history tbody tr:last-child")  # oldest: the first upload
        assert close(float(row.get_attribute("data-score")), expected["score"])
        assert not console_errors(browser, allowed=("status of 401",))


def test_stored_history_survives_a_reload_and_takes_one_click_labels(browser, fitted_model, images, tmp_path):
    """With --store the page shows the server's history (not only this page's), labels a record with one
    click, and plots the scores with the threshold and the pass rate."""
    store = open_store(str(tmp_path / "results.db"))
    stored_rows = lambda: browser.find_elements("css selector", "#stored tbody tr")  # noqa: E731
    with live_server(create_app(fitted_model, limits=LIMITS, store=store), LIMITS) as base:
        open_page(browser, base)
        page_ready(browser)
        upload(browser, images["bad"], images["good"])
        wait_for(browser, lambda: len(stored_rows()) == 2, "two stored inspections")
        open_page(browser, base)  # a reload: this page's own list is empty, the stored history is not
        page_ready(browser)
        wait_for(browser, lambda: len(stored_rows()) == 2, "the stored inspections after a reload")
        assert results(browser) == 0
        newest, oldest = stored_rows()
        assert newest.find_elements("css selector", "td")[1].text == images["good"].name
        oldest.find_element("css selector", "button.label-defect").click()
        wait_for(browser, lambda: store.find()[0][1]["label"] == "defect", "the label stored")
        wait_for(browser, lambda: stored_rows()[1].find_element("css selector", "button.label-defect")
                 .get_attribute("aria-pressed") == "true", "the label shown")
        assert store.find()[0][0]["label"] is None  # only the clicked record
        chart = by_id(browser, "stored-chart")
        assert len(chart.find_elements("css selector", "circle")) == 2
        assert chart.find_elements("css selector", "polyline.threshold")
        assert chart.find_elements("css selector", "polyline.pass-rate")
        assert "50.0 % passed" in by_id(browser, "stored-chart-note").text
        assert not console_errors(browser)
    store.close()


def test_server_gone_gives_a_message_not_a_frozen_page(browser, fitted_model, images):
    with live_server(create_app(fitted_model)) as base:
        open_page(browser, base)
        page_ready(browser)
    upload(browser, images["bad"])  # the server has stopped
    wait_for(browser, lambda: "cannot be reached" in by_id(browser, "message-text").text, "the unreachable message")
    assert by_id(browser, "busy").text == ""  # the queue finished; nothing is left spinning
    by_id(browser, "message-close").click()
    assert not by_id(browser, "message").is_displayed()


def test_a_large_upload_leaves_no_file_on_the_server(browser, fitted_model, tmp_path, monkeypatch):
    """Over 1 MB, Starlette would spool an upload to a temporary file; the service keeps it in memory."""
    spool = tmp_path / "server-tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where the server (this process) would spool
    large = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 700, 3), dtype=np.uint8)).save(large)
    assert large.stat().st_size > 1_500_000
    with live_server(create_app(fitted_model)) as base:
        open_page(browser, base)
        page_ready(browser)
        upload(browser, large)
        wait_for(browser, lambda: results(browser) == 1, "the result")
        assert by_id(browser, "verdict").get_attribute("data-verdict") in ("PASS", "FAIL")
    assert list(spool.iterdir()) == []


@pytest.fixture(scope="module")
def evaluation(fitted_model, data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluation")
    assert main(["evaluate", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--out", str(out)]) == 0
    return out


def test_report_html_is_one_self_contained_file(evaluation):
    text = (evaluation / REPORT_NAME).read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    sources = text.split('src="')[1:]
    assert len(sources) >= 4 + 2 * 4 * 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    for fragment in ("Image AUROC", "False positives", "False negatives", "test_public", "image threshold",
                     "defect-free validation image", "Image scores", "ROC and PRO curves", "Sample detections"):
        assert fragment in text, fragment


def test_report_html_renders_its_pictures_in_the_browser(browser, evaluation, tmp_path):
    browser.get((evaluation / REPORT_NAME).as_uri())
    browser.get_log("browser")
    broken = browser.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
    count = browser.execute_script("return document.images.length")
    assert count >= 4 and broken == []
    pixels = screenshot(browser, tmp_path / "report-html.png")
    assert pixels.std() > 10
    browser.execute_script("document.getElementById('worst-mistakes').scrollIntoView()")
    assert screenshot(browser, tmp_path / "report-html-mistakes.png", docs=False).std() > 10
    assert not console_errors(browser)


def test_benchmark_writes_an_index_linking_each_category_report(backbone_dir, data_root, tmp_path):
    assert main(["benchmark", "--data", str(data_root), "--backbone", str(backbone_dir), "--image-size", "112",
                 "--out", str(tmp_path)]) == 0
    index = (tmp_path / INDEX_NAME).read_text()
    assert 'href="demo/report/report.html"' in index and (tmp_path / "demo" / "report" / REPORT_NAME).is_file()
