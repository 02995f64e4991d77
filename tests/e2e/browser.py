"""Debian's headless Chromium driven by Selenium through /usr/bin/chromedriver: nothing is downloaded.

Selenium Manager (which would fetch a driver or a browser) never runs: both paths are
given explicitly, and ``SE_AVOID_BROWSER_DOWNLOAD``/``SE_OFFLINE`` forbid it should it start.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60
SCRIPT_TIMEOUT_S = 120  # the default 30 s ran out while the editor drew suggestions on a busy 2-core machine
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000",
)


def missing_browser() -> str | None:
    """Why the browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing: run scripts/install.sh --test (Debian packages chromium, chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: run scripts/install.sh --test"
    return None


def start_chromium(profile_dir: Path, log: Path):
    """A fresh headless Chromium with its own profile; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_BROWSER_DOWNLOAD"] = "true"
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(SCRIPT_TIMEOUT_S)
    return driver


def wait(driver, condition: Callable, what: str, timeout_s: float = WAIT_S):
    """``condition``'s first truthy value, polled; a timeout names ``what`` was awaited."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition, f"waiting for {what}")


@contextmanager
def logged_in_chromium(url: str, user: str, password: str, folder: Path) -> Iterator:
    """A fresh Chromium (profile and driver log under ``folder``) logged in to Label Studio at ``url``."""
    from selenium.webdriver.common.by import By

    chrome = start_chromium(folder / "profile", folder / "chromedriver.log")
    try:
        chrome.get(url + "/user/login/")
        wait(chrome, lambda d: d.find_elements(By.NAME, "email"), "the login form")
        chrome.find_element(By.NAME, "email").send_keys(user)
        chrome.find_element(By.NAME, "password").send_keys(password)
        chrome.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait(chrome, lambda d: "/user/login" not in d.current_url, "logging in")
        yield chrome
    finally:
        chrome.quit()
