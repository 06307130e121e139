"""Notebook 00 in JupyterLab, run in headless Chromium as a learner would: Run > Run All Cells.

Select or skip these tests with `-m browser` / `-m "not browser"`. They need Debian's `chromium` and
`chromium-driver` packages and the `selenium` package; without them they are skipped. Everything stays on
127.0.0.1: JupyterLab's news feed and update check are off, and Chromium's background networking is disabled.
Screenshots go to $BROWSER_SCREENSHOT_DIR, or tests/artifacts/ (git-ignored).
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "00_setup_and_data.ipynb"
CHROMIUM = Path(os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]
SERVER_START_SECONDS = 60
# Run All of notebook 00 at smoke took under 20 s on a 2-core CPU at load 2-4, but more than 150 s at load 9-11
# (every cell had run when the wait gave up), so the limit allows for a machine shared with other jobs.
RUN_ALL_SECONDS = 400

EXECUTED_PROMPT = re.compile(r"^\[\d+\]:?$")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: run `make install`")
if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
    pytest.skip(f"Chromium ({CHROMIUM}) or its driver ({CHROMEDRIVER}) is missing: install Debian's chromium and "
                "chromium-driver packages, as .ci/run does", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402, after the skips above
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jupyter_config(config_dir):
    """Keep the server offline and the layout testable: no news, no update check, every cell in the page."""
    config_dir.mkdir(parents=True)
    server = {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                         "extension_manager": "readonly"}}
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(server))
    settings = config_dir / "lab" / "user-settings" / "@jupyterlab"
    # JupyterLab 4 renders only the cells in view by default, which would hide outputs from the page.
    (settings / "notebook-extension").mkdir(parents=True)
    # Without autoStartDefaultKernel, JupyterLab opens a dialog to choose the kernel.
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none", "autoStartDefaultKernel": true}')
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')


@pytest.fixture
def jupyter_lab(tmp_path):
    """Start JupyterLab on 127.0.0.1 over a copy of notebook 00, and yield its (base URL, token, root dir)."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    write_jupyter_config(tmp_path / "config")
    port, token = free_port(), secrets.token_hex(16)
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # keep figures inline
    env.update(LABUTILS_PROFILE="smoke", LABUTILS_RESULTS_DIR=str(tmp_path / "results"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), IPYTHONDIR=str(tmp_path / "ipython"))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True"]  # CI runs as root
    log = (tmp_path / "jupyter.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, token, server, tmp_path / "jupyter.log")
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def wait_for_server(url, token, server, log_path):
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with status {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not respond within {SERVER_START_SECONDS} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def browser(tmp_path, monkeypatch):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # Both paths are given, so Selenium Manager has nothing to look up, and offline mode keeps it from trying.
    monkeypatch.setenv("SE_OFFLINE", "true")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def screenshot_dir():
    folder = Path(os.environ.get("BROWSER_SCREENSHOT_DIR") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def show(driver, element, file_name):
    """Scroll `element` to the middle of the notebook and save a screenshot."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    driver.save_screenshot(str(screenshot_dir() / file_name))


def click_menu(driver, menu, command):
    """Open a top-level menu by its label and click the item that runs `command`."""
    wait = WebDriverWait(driver, 30)
    label = f"//div[contains(@class, 'lm-MenuBar-itemLabel') and normalize-space(text())='{menu}']"
    wait.until(lambda d: d.find_element(By.XPATH, label)).click()
    item = f"//li[contains(@class, 'lm-Menu-item') and @data-command='{command}']"
    wait.until(lambda d: d.find_element(By.XPATH, item)).click()


def kernel_ready(driver):
    """Accept a kernel dialog if one is open, and return True once the notebook's kernel is idle."""
    for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"):
        button.click()
    status = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
    kernel = driver.find_elements(By.XPATH, "//*[contains(@class, 'jp-KernelName') or "
                                            "contains(@class, 'jp-Toolbar-kernelName')]")
    return bool(status) and any("Python" in element.text for element in kernel)


def executed_cells(driver):
    """Count the code cells whose prompt shows an execution count, such as [12]:."""
    prompts = driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputArea-prompt")
    return sum(bool(EXECUTED_PROMPT.match(prompt.text.strip())) for prompt in prompts)


def page_tracebacks(driver):
    """Return the start of every output on the page that shows a traceback."""
    outputs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
    return [output.text[:300] for output in outputs if "Traceback" in output.text]


def wait_until_all_ran(driver, code_cells):
    """Wait until every code cell shows an execution count, or an error stops Run All, and the kernel is idle."""
    def finished(d):
        idle = d.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
        return bool(idle) and (executed_cells(d) == code_cells or bool(page_tracebacks(d)))

    WebDriverWait(driver, RUN_ALL_SECONDS, poll_frequency=1).until(finished)


def saved_outputs(path, code_cells):
    """Wait until the saved notebook has outputs in every code cell, and return its code cells."""
    deadline = time.monotonic() + 30
    while True:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        if sum(c.execution_count is not None for c in cells) == code_cells or time.monotonic() > deadline:
            return cells
        time.sleep(0.5)


def test_run_all_cells_in_jupyterlab(jupyter_lab, browser):
    url, token, root = jupyter_lab
    code_cells = sum(cell.cell_type == "code" for cell in nbformat.read(root / NOTEBOOK, as_version=4).cells)
    browser.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
    WebDriverWait(browser, 60).until(kernel_ready)

    click_menu(browser, "Run", "runmenu:run-all")
    try:
        wait_until_all_ran(browser, code_cells)
    except Exception:
        browser.save_screenshot(str(screenshot_dir() / "notebook00_failure.png"))
        raise

    assert page_tracebacks(browser) == []
    assert executed_cells(browser) == code_cells
    figures = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    assert figures
    show(browser, figures[0], "notebook00_figure.png")
    bars = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hprogress")
    assert bars
    show(browser, bars[0], "notebook00_progress_bar.png")

    # What the page showed, as the notebook file records it once saved from the browser.
    click_menu(browser, "File", "docmanager:save")
    cells = saved_outputs(root / NOTEBOOK, code_cells)
    errors = [f"{output.ename}: {output.evalue}" for cell in cells for output in cell.outputs
              if output.output_type == "error"]
    assert errors == []
    assert sum(cell.execution_count is not None for cell in cells) == code_cells
