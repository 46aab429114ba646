"""The studio in a real browser: headless Chromium drives the page from a toy data folder to a downloaded LoRA.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium; skipped, saying so,
only where those are missing, and never in CI (CI=true makes a missing browser a failure). Set STUDIO_SCREENSHOTS=docs/images to refresh the screenshots in the docs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]
CAPTION = "a sks heart, edited in the studio"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, DRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install -y chromium chromium-driver (.ci/run does)"
    return None


def toy_folder(folder: Path, n: int = 8) -> Path:
    from finetune.toy import world

    folder.mkdir(parents=True)
    for i, (img, cap) in enumerate(world.subject_images("red_heart", n, seed=0)):
        img.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(cap.replace("red heart", "sks heart") + "\n")
    return folder


@pytest.fixture()
def studio(tmp_path):
    reason = _missing()
    if reason and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {reason}")
    if reason:
        pytest.skip(reason)
    root = tmp_path / "root"
    toy_folder(root / "data" / "heart")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    server = subprocess.Popen([sys.executable, "-m", "finetune", "studio", "--root", str(root), "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _up(url), 90, "the studio server to answer")
        yield url, root
    finally:
        _stop_runs(url)
        server.terminate()
        out, _ = server.communicate(timeout=30)
        print(out)


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/info", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop_runs(url: str) -> None:
    """Leave no trainer behind if the test failed halfway."""
    import json

    try:
        with urllib.request.urlopen(url + "/api/runs", timeout=5) as r:
            runs = json.load(r)["runs"]
    except OSError:
        return
    for run in runs:
        if run["status"] in ("queued", "running"):
            req = urllib.request.Request(f"{url}/api/runs/{run['id']}/stop", method="POST", headers={"X-Studio": "1"})
            urllib.request.urlopen(req, timeout=5).close()
            _wait_for(lambda run=run: _status(url, run["id"]) not in ("running", "stopping"), 120, "the run to stop")


def _status(url: str, run_id: str) -> str:
    import json

    with urllib.request.urlopen(f"{url}/api/runs/{run_id}", timeout=10) as r:
        return json.load(r)["run"]["status"]


def _wait_for(check, timeout: float, what: str):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = check()
        except StaleElementReferenceException:  # the live page redrew that element: look again
            got = None
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        driver.quit()
        assert not errors, f"errors in the browser console: {errors}"


class Page:
    def __init__(self, driver, url: str, shots: Path):
        self.d, self.url, self.shots = driver, url, shots

    def open(self, hash_: str) -> None:
        self.d.get(f"{self.url}/#{hash_}")
        name = hash_.split("/")[0].split("?")[0]
        _wait_for(lambda: self.d.find_element("id", "page").get_attribute("data-ready") == name, 60, f"page {name}")

    def css(self, selector: str, timeout: float = 30):
        return _wait_for(lambda: self.d.find_elements("css selector", selector), timeout, selector)[0]

    def type(self, selector: str, text: str) -> None:
        el = self.css(selector)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        el.clear()
        el.send_keys(text)

    def shot(self, name: str) -> Path:
        path = self.shots / f"studio-{name}.png"
        self.d.save_screenshot(str(path))
        return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_studio_from_data_folder_to_downloaded_lora(studio, browser, tmp_path):
    url, root = studio
    shots = tmp_path / "shots"
    shots.mkdir()
    p = Page(browser, url, shots)

    # -- data: open the folder, edit one caption in place: the .txt changes on disk, the image does not
    image, sidecar = root / "data/heart/0000.png", root / "data/heart/0000.txt"
    image_before = _sha(image)
    p.open("data")
    p.css('[data-folder="data"]').click()
    p.css('[data-folder="data/heart"]').click()
    _wait_for(lambda: len(browser.find_elements("css selector", ".tile")) == 8, 30, "8 image tiles")
    assert "64x64" in p.css("#bucket-plan").text
    p.type('textarea[data-image="data/heart/0000.png"]', CAPTION)
    p.css("h2").click()  # leaving the box saves it
    p.css('.tile.saved[data-tile="data/heart/0000.png"]')
    assert sidecar.read_text() == CAPTION + "\n"
    assert _sha(image) == image_before
    p.css("#use-folder").click()
    p.shot("data")

    # -- recipe: the toy LoRA recipe with the folder as data; a bad value shows its error beside the field
    p.open("recipe")
    assert p.css('[data-key="data.sources.0.path"]').get_attribute("value") == "data/heart"
    p.type('[data-key="train.lr"]', "-5")
    error = p.css('[data-error="train.lr"]')
    _wait_for(lambda: "greater than 0" in error.text, 30, "the train.lr error")
    assert error.text.startswith("recipe.yaml: train.lr: -5")
    assert "invalid" in p.css('[data-field="train.lr"]').get_attribute("class")
    p.shot("recipe")
    overrides = {"train.lr": "0.001", "train.output_dir": "runs/heart", "train.max_steps": "100000",
                 "train.batch_size": "4", "validation.seeds": "0, 1", "validation.steps": "4"}
    for key, value in overrides.items():
        p.type(f'[data-key="{key}"]', value)
    yaml_text = lambda: p.css("#recipe-yaml").get_attribute("textContent")  # noqa: E731
    _wait_for(lambda: "batch_size: 4" in yaml_text() and "steps: 4" in yaml_text(), 30, "the YAML to follow the form")
    _wait_for(lambda: p.css("#recipe-status").text == "valid", 30, "the recipe to validate")
    assert error.text == ""
    assert "output_dir: runs/heart" in yaml_text() and "path: data/heart" in yaml_text()
    downloaded = browser.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('recipe-download').href)"
        ".then(r => r.text()).then(done)")
    assert "max_steps: 100000" in downloaded
    p.css("#start-run").click()

    # -- run: loss curve and the step-0 grid appear; stop (SIGTERM: the trainer checkpoints), resume to a end
    _wait_for(lambda: "#run/" in browser.current_url, 30, "the run page")
    run_id = browser.current_url.split("#run/")[1]
    p.open(f"run/{run_id}")
    p.css('#loss-chart path[data-series="loss"]', timeout=240)
    p.css('#run-grids figure[data-step="0"] img', timeout=120)
    _wait_for(lambda: int(p.css("#run-step").text.split("/")[0]) >= 2, 120, "two steps")
    p.css("#stop-run").click()
    _wait_for(lambda: p.css("#run-status").text == "stopped", 180, "the run to stop")
    out = root / "runs" / "heart"
    ckpts = sorted((out / "checkpoints").glob("step-*/COMPLETE"))
    assert ckpts, "stopping wrote no checkpoint"
    stopped_at = int(ckpts[-1].parent.name.split("-")[1])
    assert stopped_at >= 2 and not (out / "pytorch_lora_weights.safetensors").exists()
    final = stopped_at + 3
    p.type("#resume-steps", str(final))
    p.css("#resume-run").click()
    _wait_for(lambda: p.css("#run-status").text == "done", 300, "the resumed run to finish")
    p.css(f'#run-grids figure[data-step="{final}"] img', timeout=30)
    rows = [ln.split(",")[0] for ln in (out / "logs" / "loss.csv").read_text().split()[1:]]
    assert [int(s) for s in rows] == list(range(1, final + 1))
    assert "resumed from" in (root / ".studio" / "runs" / run_id / "log.txt").read_text()

    # -- the LoRA downloads through the page, byte for byte the run's file
    link = p.css('a[data-export="pytorch_lora_weights.safetensors"]')
    p.css("#model-card")
    p.shot("run")
    link.click()
    got = browser.downloads / "pytorch_lora_weights.safetensors"
    _wait_for(got.is_file, 60, "the download")
    assert _sha(got) == _sha(out / "pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(str(got), "pt") as f:
        assert any("lora" in k for k in f.keys())

    # -- compare: step 0 and the last step side by side, same prompts and seeds; the runs list
    p.open(f"compare/{run_id}")
    for i in (0, 1):
        img = p.css(f"#cmp-img-{i}")
        _wait_for(lambda img=img: browser.execute_script("return arguments[0].naturalWidth", img) > 0, 30, "a grid")
    assert p.css("#cmp-step-1").get_attribute("value") == str(final)
    assert p.css("#cmp-same").text.startswith("same prompts and seeds")
    p.shot("compare")
    p.open("runs")
    assert "done" in p.css(f'tr[data-run="{run_id}"]').text
    p.shot("runs")
    _keep_screenshots(shots)


def _keep_screenshots(shots: Path) -> None:
    """With STUDIO_SCREENSHOTS=DIR, copy the screenshots there as small palette PNGs (docs/images)."""
    target = os.environ.get("STUDIO_SCREENSHOTS")
    for path in shots.glob("*.png"):
        from PIL import Image

        with Image.open(path) as im:
            assert im.size[0] >= 1000 and len(set(im.convert("L").getdata())) > 16, f"{path.name} looks blank"
            if target:
                Path(target).mkdir(parents=True, exist_ok=True)
                im.convert("RGB").quantize(colors=64).save(Path(target) / path.name, optimize=True)
