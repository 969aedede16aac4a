"""`fleet web` in a real browser: Debian's Chromium, headless, driven by
Selenium through chromedriver, against a real `fleet web` (uvicorn), a real
`fleet worker` and Redis. The task list shows submitted tasks, a running
task's log grows on its page as it prints, a read-only session has no
actions, and cancel from the page (signed in) cancels the task.

Screenshots of each page go to $FLEET_SCREENSHOTS if set (that is how
docs/screenshots/ was made), else to the test's own directory."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from support import FLEET, MakeFleet, Worker, free_port, wait_for_state

from fleet.record import State

TOKEN = "a-token-for-the-browser-test"
# As the machine's notes say: without the background-networking flags Chromium
# keeps trying hosts this closed network refuses.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1360,900")


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: WebDriver) -> list[str]:
    found = driver.find_elements(By.CSS_SELECTOR, "tr[data-task]")
    return [str(row.get_attribute("data-task")) for row in found]


def test_the_dashboard_in_a_real_browser(make_fleet: MakeFleet, tmp_path: Path) -> None:
    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN + "\n")
    fleet = make_fleet({"dev": {"concurrency": 2}, "boss": {}}, web_token_file=str(token_file))
    fleet.start_worker().wait_for_line(" ready.", count=2)
    port = free_port()
    web = Worker(subprocess.Popen([FLEET, "web", "--port", str(port)], env=fleet.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True))
    fleet.workers.append(web)  # stopped with the fleet
    web.wait_for_line("Uvicorn running on http://127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    shots = Path(os.environ.get("FLEET_SCREENSHOTS") or tmp_path)
    client = fleet.client()
    listed = [client.submit("dev", {"echo": f"task {n}"}) for n in range(3)]
    failing = client.submit("boss", {"exit": 3})
    client.wait_many([*listed, failing], 60)
    talker = client.submit("dev", {"lines": 15, "interval": 0.4})

    with chromium(tmp_path / "profile") as driver:
        driver.get(f"{base}/tasks")
        assert {*listed, failing} <= set(rows(driver))
        driver.save_screenshot(str(shots / "tasks.png"))
        driver.get(f"{base}/tasks?agent=boss&state=failed")
        assert rows(driver) == [failing]

        wait_for_state(client, talker, State.RUNNING)
        driver.get(f"{base}/tasks/{talker}")
        first = driver.find_element(By.ID, "log").text
        WebDriverWait(driver, 30).until(lambda d: "line 15" in d.find_element(By.ID, "log").text)
        assert first.count("line ") < 15  # the page showed fewer, then the rest arrived on it
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "state").text == "succeeded")
        driver.save_screenshot(str(shots / "task.png"))

        sleeper = client.submit("dev", {"sleep": 60})
        wait_for_state(client, sleeper, State.RUNNING)
        driver.get(f"{base}/tasks/{sleeper}")  # read-only: no actions anywhere
        assert driver.find_elements(By.TAG_NAME, "button") == [] and "read-only" in driver.page_source
        for page in ("agents", "hosts", "alerts"):
            driver.get(f"{base}/{page}")
            assert driver.find_elements(By.TAG_NAME, "button") == []
            assert "dev" in driver.page_source if page != "alerts" else "kind" in driver.page_source
            driver.save_screenshot(str(shots / f"{page}.png"))

        driver.get(f"{base}/login")
        driver.find_element(By.NAME, "token").send_keys(TOKEN)
        driver.find_element(By.TAG_NAME, "form").submit()
        WebDriverWait(driver, 10).until(lambda d: "operator" in d.page_source)
        driver.get(f"{base}/tasks/{sleeper}")
        driver.save_screenshot(str(shots / "task-signed-in.png"))
        driver.find_element(By.ID, "cancel").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "state").text == "cancelled")
    assert client.wait(sleeper, 30).state == State.CANCELLED
