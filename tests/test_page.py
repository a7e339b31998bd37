"""The page for people (`GET /` of the service), end to end in a real headless Chromium.

Uses the session fixture `served` (tests/conftest.py) and Debian's /usr/bin/chromium driven by Playwright
(`.ci/run` installs the apt package; Playwright's own browser download is not used). Without Chromium the
browser tests skip and say so. Screenshots (desktop and 375 px phone width) go to the test's tmp_path.
"""

import json
import os
from pathlib import Path

import pytest
import requests

from tests.conftest import MAX_BYTES

CHROMIUM = Path("/usr/bin/chromium")
# --disable-background-networking and friends: without them Chromium's own connections are refused on a closed
# network and it stalls; a fresh profile (user data dir) per run
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install chromium (.ci/run does) to run the page tests"
)


def percent(p: float) -> str:
    """As the page writes a probability (JavaScript's toFixed(1))."""
    return f"{100 * p:.1f}%"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A Chromium context with a fresh profile that records every URL the page asks for."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1024, "height": 800},
        )
        context.requested = []
        context.on("request", lambda r: context.requested.append(r.url))
        yield context
        context.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page()
    page.set_default_timeout(60_000)  # a 2-core CI machine: the first forward pass can take a while
    page.goto(served["url"] + "/")
    page.wait_for_selector("#model dt:text('Version')")  # GET /info answered
    yield page
    page.close()


def cat_photo(served) -> Path:
    return sorted((served["tmp"] / "prepared" / "valid" / "cats").iterdir())[0]


def api(served, name: str, data: bytes) -> requests.Response:
    return requests.post(f"{served['url']}/classify", files={"image": (name, data)}, timeout=120)


@pytest.mark.slow
def test_page_info_and_bentoml_routes_coexist(served):
    r = requests.get(served["url"] + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<input type="file"' in r.text and "http://" not in r.text and "https://" not in r.text  # offline
    info = requests.get(served["url"] + "/info", timeout=30).json()
    record = json.loads((served["tmp"] / "bentoml-model.json").read_text())
    assert f"{info['name']}:{info['version']}" == record["tag"]
    assert info["evaluate"] == json.loads((served["metrics"] / "evaluate.json").read_text())
    for path in ("/livez", "/readyz", "/metrics"):
        assert requests.get(served["url"] + path, timeout=30).status_code == 200, path
    assert requests.post(served["url"] + "/", timeout=30).status_code == 405  # the page is GET only


@pytest.mark.slow
@needs_chromium
def test_page_shows_what_the_api_answers(page, served, tmp_path):
    photo = cat_photo(served)
    expected = api(served, photo.name, photo.read_bytes()).json()

    page.keyboard.press("Tab")  # keyboard users land on the real file input first
    assert page.evaluate("document.activeElement.id") == "photo"
    page.set_input_files("#photo", photo)
    page.wait_for_selector("#answer:not([hidden])")
    assert page.inner_text("#label") == f"It's a {expected['label']}."
    assert page.inner_text("#p-cat") == percent(expected["p_cat"])
    assert page.inner_text("#p-dog") == percent(expected["p_dog"])
    bar = page.evaluate("['bar', 'bar-dog'].map(id => document.getElementById(id).clientWidth)")
    assert bar[1] / bar[0] == pytest.approx(expected["p_dog"], abs=0.02)
    assert page.is_visible("#preview") and not page.is_visible("#error")

    # the model facts come from the store's metadata: version and validation metrics
    record = json.loads((served["tmp"] / "bentoml-model.json").read_text())
    metrics = json.loads((served["metrics"] / "evaluate.json").read_text())
    facts = page.inner_text("#model")
    assert record["tag"].split(":")[1] in facts
    assert f"{percent(metrics['accuracy'])} of {metrics['n']} photos" in facts
    assert f"{metrics['log_loss']:.4f}" in facts
    info = requests.get(served["url"] + "/info", timeout=30).json()
    calibrated = {"temperature": "log_loss_temperature_clipped", "clip": "log_loss_clipped"}[metrics["calibration"]]
    assert f"Log loss, calibrated\n{metrics[calibrated]:.4f}" in facts  # the loss of what is applied
    cal = info["calibration"]  # the applied TTA, temperature and clip, and what runs them
    flip, close = "flip TTA, ", "TTA: the photo, a closer crop and their mirrors, "  # what page.html names each
    views = {True: flip, "flip": flip, "flip+close": close}[cal["tta"]]
    assert f"Calibration\n{views}temperature {cal['temperature']:.3f}, clip {cal['clip']:.4f}" in facts
    assert f"Runs\n{info['variant']} on {info['provider'].upper()}" in facts
    assert ("Note\n" + info["note"] in facts) != info["same_as_submission"]  # a note when P is not the submission's

    page.screenshot(path=tmp_path / "page-desktop.png", full_page=True)
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling on a phone
    page.screenshot(path=tmp_path / "page-phone.png", full_page=True)
    assert (tmp_path / "page-desktop.png").stat().st_size > 0 and (tmp_path / "page-phone.png").stat().st_size > 0

    origin = served["url"]  # no CDN: every request goes to the service (or is the preview's blob: of it)
    assert all(url.removeprefix("blob:").startswith(origin) for url in page.context.requested), page.context.requested


@pytest.mark.slow
@needs_chromium
@pytest.mark.parametrize(
    "name, data, status, lead",
    [
        ("notes.txt", b"hello, I am text", 400, "That file is not a photo this page can use."),
        ("big.jpg", os.urandom(MAX_BYTES + 10), 413, "That file is too large."),
    ],
)
def test_page_shows_api_errors_in_plain_words(page, served, tmp_path, name, data, status, lead):
    upload = tmp_path / name
    upload.write_bytes(data)
    r = api(served, name, data)
    assert r.status_code == status

    page.set_input_files("#photo", upload)
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == f"{lead} The service says: {r.json()['error']}."
    page.wait_for_selector("#preview", state="hidden")  # no broken-image icon for a file that is no image
    assert not page.is_visible("#answer")
    page.screenshot(path=tmp_path / f"page-error-{status}.png", full_page=True)


@pytest.mark.slow
@needs_chromium
def test_a_dropped_photo_is_classified(page, served):
    photo = cat_photo(served)
    expected = api(served, photo.name, photo.read_bytes()).json()
    page.evaluate(
        """async ([name, bytes]) => {
            const data = new DataTransfer();
            data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/jpeg" }));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: data }));
        }""",
        [photo.name, list(photo.read_bytes())],
    )
    page.wait_for_selector("#answer:not([hidden])")
    assert page.inner_text("#p-dog") == percent(expected["p_dog"])
