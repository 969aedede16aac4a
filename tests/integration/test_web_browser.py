"""`fleet web` in a real browser: Debian's Chromium, headless, driven by
Selenium through chromedriver, against a real `fleet web` (uvicorn), a real
`fleet worker` and Redis. The task list shows submitted tasks, a running
task's log grows on its page as it prints, a read-only session has no
actions, and cancel from the page (signed in) cancels the task.

Screenshots of each page go to $FLEET_SCREENSHOTS if set (that is how
docs/screenshots/ was made), else to the test's own directory."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
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
    retried = client.submit("dev", {"exit": 75, "fail_until_attempt": 2})  # transient once, then fine
    client.wait_many([*listed, failing, retried], 60)
    talker = client.submit("dev", {"lines": 15, "interval": 0.6})

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
        assert first.count("line ") < 15, first  # the page showed fewer, then the rest arrived on it
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
        # The form's post loads the page again: an element read as the old page goes is stale, not wrong.
        WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda d: d.find_element(By.ID, "state").text == "cancelled")
    assert client.wait(sleeper, 30).state == State.CANCELLED

    # /metrics, as Prometheus reads it, agrees with `fleet tasks` after the mixed run.
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
        families = list(text_string_to_metric_families(answer.read().decode()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    listed_now = json.loads(fleet.cli("tasks", "--json").stdout)
    by_state = Counter((t["agent"], t["state"]) for t in listed_now)
    scraped = {(agent, str(state)): samples[("fleet_tasks", (("agent", agent), ("state", str(state))))]
               for agent in ("dev", "boss") for state in State}
    assert scraped == {key: by_state[key] for key in scraped}, listed_now
    finished = {(a, o): samples[("fleet_tasks_finished_total", (("agent", a), ("outcome", o)))]
                for a in ("dev", "boss") for o in ("succeeded", "failed", "cancelled")}
    assert finished == {("dev", "succeeded"): 5, ("dev", "failed"): 0, ("dev", "cancelled"): 1,
                        ("boss", "succeeded"): 0, ("boss", "failed"): 1, ("boss", "cancelled"): 0}
    assert samples[("fleet_task_retries_total", (("agent", "dev"), ("kind", "transient")))] == 1
    assert samples[("fleet_task_duration_seconds_count", (("agent", "dev"),))] == 6
    assert samples[("fleet_host_up", (("host", "testhost"),))] == 1
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as answer:
        assert json.loads(answer.read()) == {"status": "ok", "redis": "ok"}


def test_fleet_web_refuses_to_bind_beyond_loopback_without_a_token(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({"dev": {}})
    refused = fleet.cli("web", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert "binds to 0.0.0.0 only with web_token_file set" in refused.stderr
