"""/dashboard in the real browser (Debian's Chromium through Selenium), against the backend under gunicorn with
basic auth, after two real trainings of the tiny trimap model into a project's store.

Without credentials the page and every image on it answer 401 (in the browser and to a plain client); with
them the page shows the project's versions (each with its validation IoU, baselines and promotion reason),
the IoU history, and every curves/overlay image loads (``naturalWidth > 0``). Screenshots in the test's
output folder (``tmp_path``): ``dashboard.png`` (the window) and ``dashboard-full.png`` (the whole page).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from e2e.browser import start_chromium, wait
from e2e.servers import Backend, start_backend, stop

PROJECT = 41
AUTH = ("ops", "dashboard-secret")


@pytest.fixture(scope="module")
def trained_backend(e2e_dir: Path, tiny_sam_preset: Path) -> Iterator[tuple[Backend, list]]:
    import training  # noqa: F401  (the torch backend before keras)
    from training.data import write_synthetic
    from training.fit import fit
    from training.layout import project_store_dir

    model_dir = e2e_dir / "dashboard-models"
    write_synthetic(e2e_dir / "dashboard-data", count=12, size=40, seed=5)
    store = project_store_dir(model_dir, PROJECT)
    reports = [fit(e2e_dir / "dashboard-data", store, epochs=epochs, image_size=16, batch_size=4, verbose=0)
               for epochs in (1, 2)]
    # No Label Studio needed: the page reads the stores and the process's own state.
    backend = start_backend(e2e_dir, {"SAM_MODEL": str(tiny_sam_preset), "MODEL_DIR": str(model_dir),
                                      "PREENCODE": "false", "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]})
    try:
        yield backend, reports
    finally:
        stop(backend.process)


FETCH_STATUSES = """
const [urls, done] = [arguments[0], arguments[arguments.length - 1]];
Promise.all(urls.map(u => fetch(u, {credentials: 'omit', cache: 'no-store'}).then(r => r.status)))
  .then(done, e => done(String(e)));
"""


def statuses_without_credentials(chrome, backend: Backend, urls: list[str]) -> list[int]:
    """What the browser gets for ``urls`` without credentials (fetched from /health, a public page of the same
    origin: a navigation to a 401 with ``WWW-Authenticate`` would only open the browser's login prompt)."""
    chrome.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    chrome.get(backend.url + "/health")
    return chrome.execute_async_script(FETCH_STATUSES, urls)


@pytest.mark.timeout(900)
def test_dashboard_in_chromium(browser_ready, trained_backend, tmp_path: Path) -> None:
    backend, reports = trained_backend
    chrome = start_chromium(tmp_path / "profile", tmp_path / "chromedriver.log")
    try:
        chrome.execute_cdp_cmd("Network.enable", {})
        # No credentials: not the page.
        assert statuses_without_credentials(chrome, backend, [backend.url + "/dashboard"]) == [401]

        # With them (sent on every request, as a browser does after the basic-auth prompt).
        token = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
        chrome.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
        chrome.get(backend.url + "/dashboard")
        wait(chrome, lambda d: d.find_elements("css selector", f"#project-{PROJECT} table.versions"),
             "the project's versions")
        rows = chrome.find_elements("css selector", f"#project-{PROJECT} tr.version")
        assert [r.get_attribute("id") for r in rows] == [f"version-{PROJECT}-{r.version_id}"
                                                          for r in reversed(reports)]  # newest first
        for row, report in zip(rows, reversed(reports)):
            assert f"{report.val_foreground_iou:.4f}" in row.text and report.promotion_reason in row.text
        assert chrome.find_elements("css selector", f"#project-{PROJECT} figure.iou-history svg")
        images = chrome.find_elements("css selector", f"#project-{PROJECT} img.artifact")
        assert len(images) == 2 * len(reports)
        wait(chrome, lambda d: d.execute_script(
            "return [...document.querySelectorAll('img.artifact')].every(i => i.complete && i.naturalWidth > 0)"),
            "every curves/overlay image to load")
        chrome.save_screenshot(str(tmp_path / "dashboard.png"))
        chrome.set_window_size(1400, chrome.execute_script("return document.body.scrollHeight") + 200)
        chrome.save_screenshot(str(tmp_path / "dashboard-full.png"))
        sources = [image.get_attribute("src") for image in images]

        # Nor any image on it, once the credentials are gone.
        assert statuses_without_credentials(chrome, backend, sources) == [401] * len(sources)
    finally:
        chrome.quit()

    # Every image on the page needs the credentials too; with them it is the version's file.
    for source in sources:
        assert requests.get(source, timeout=30).status_code == 401
        answer = requests.get(source, auth=AUTH, timeout=30)
        assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    assert requests.get(backend.url + "/dashboard", timeout=30).status_code == 401
