"""The results commands (runs, export-results, card, report) and the HTML report, rendered in headless
Chromium: tables, images, sorting, filtering and no console errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantbench.cli.main import app
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

runner = CliRunner()
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A store with 8 finished runs and 1 failed run, its cards and report.html."""
    tmp = tmp_path_factory.mktemp("report")
    data = tiny_sweep("report-test", backends=["tensorrt", "academic", "snpe"], bits=["W8A8", "W4A4"],
                      methods=[{"kind": "ptq", "calibrator": "minmax", "calib_size": 32},
                               {"kind": "ptq", "w_observer": "minmax", "a_observer": "mse", "calib_size": 32}])
    data["backends"] = ["tensorrt", "academic"]
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(data))
    fail = tiny_sweep("report-fail", backends=["snpe"], methods=[{"kind": "fault_test", "calibrator": "minmax",
                                                                  "calib_size": 32, "faults": {"snpe": "raise"}}])
    (tmp / "fail.yaml").write_text(yaml.safe_dump(fail))
    result = runner.invoke(app, ["bench", str(tmp / "sweep.yaml"), "--out", str(tmp), "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["bench", str(tmp / "fail.yaml"), "--out", str(tmp), "--quiet"])
    assert result.exit_code == 1 and "injected failure" in result.output
    result = runner.invoke(app, ["report", "--out", str(tmp)])
    assert result.exit_code == 0 and "report.html" in result.output
    return tmp


def _done_ids(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "cards").glob("*.json"))


def test_bench_resumes_and_lists(out):
    result = runner.invoke(app, ["bench", str(out / "sweep.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0 and "8 already complete in the store (skipped), 0 to run" in result.output
    result = runner.invoke(app, ["runs", "--out", str(out), "--status", "failed"])
    assert result.exit_code == 0 and "report-fail" in result.output and "RuntimeError" in result.output
    result = runner.invoke(app, ["bench", str(out / "sweep.yaml"), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0 and result.output.count(" done ") == 8


def test_export_results_csv_and_json(out):
    result = runner.invoke(app, ["export-results", "--out", str(out), "--format", "csv", "--sweep", "report-test"])
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 8 and {"quant_top1", "calib_seconds", "model_size_bytes"} <= rows[0].keys()
    path = out / "export.json"
    result = runner.invoke(app, ["export-results", "--out", str(out), "--format", "json", "-o", str(path)])
    data = json.loads(path.read_text())
    assert len(data) == 9 and all({"config", "environment", "card", "metrics"} <= d.keys() for d in data)
    assert data[0]["environment"]["torch"] and data[0]["config"]["model"] == "digits_cnn"


def test_card_command(out):
    run_id = _done_ids(out)[0]
    result = runner.invoke(app, ["card", run_id[:8], "--out", str(out)])
    assert result.exit_code == 0 and "| Quantization Method |" in result.output
    result = runner.invoke(app, ["card", run_id, "--out", str(out), "--json"])
    assert json.loads(result.output)["run"]["run_id"] == run_id
    assert (out / "cards" / f"{run_id}.md").read_text().startswith("# Quantization card")


def test_results_commands_give_clear_errors(tmp_path, out):
    result = runner.invoke(app, ["runs", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no results store at" in result.output
    assert not (tmp_path / "quantbench.db").exists()
    result = runner.invoke(app, ["card", "zzzz", "--out", str(out)])
    assert result.exit_code == 2 and "no run 'zzzz'" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_sweep(), "worker": 3}))
    result = runner.invoke(app, ["bench", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown key 'worker'" in result.output
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text(yaml.safe_dump(tiny_sweep(backends=["academic", "tensorrt"], deploy=True)))
    result = runner.invoke(app, ["bench", str(impossible), "--out", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2 and "academic" in result.output and "not deployable" in result.output
    result = runner.invoke(app, ["bench", str(impossible), "--out", str(tmp_path), "--dry-run", "--on-invalid",
                                 "skip"])
    assert result.exit_code == 0 and "skipped: digits_cnn × academic" in result.output and "1 runs" in result.output


def test_report_is_self_contained(out):
    html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "nothing is fetched from the network"
    assert "<script src" not in html and 'rel="stylesheet"' not in html
    assert html.count('src="data:image/png;base64,') == 3
    for run_id in _done_ids(out):
        assert f'id="card-{run_id}"' in html
    assert "injected failure" in html and html.count("<table class=\"sortable leaderboard\"") == 1


def _driver(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(CHROMIUM is None or not Path(CHROMEDRIVER).is_file(),
                    reason="headless Chromium is not installed: apt-get install chromium chromium-driver "
                           "(Debian packages; .ci/run installs them) to render the report in a browser")
def test_report_renders_in_headless_chromium(out, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _driver(tmp_path)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", "the inline script ran"
        rows = driver.find_elements(By.CSS_SELECTOR, "table.leaderboard tbody tr")
        assert len(rows) == 8
        images = driver.find_elements(By.CSS_SELECTOR, "figure img")
        assert len(images) == 3
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 300", i)
                   for i in images)
        # sort by quantized top-1, ascending then descending
        header = next(th for th in driver.find_elements(By.CSS_SELECTOR, "table.leaderboard th")
                      if th.text.startswith("quant top-1"))
        col = driver.execute_script("return arguments[0].cellIndex", header)
        header.click()
        values = lambda: [float(r.find_elements(By.TAG_NAME, "td")[col].text)  # noqa: E731
                          for r in driver.find_elements(By.CSS_SELECTOR, "table.leaderboard tbody tr")]
        assert values() == sorted(values())
        header.click()
        assert values() == sorted(values(), reverse=True) and header.get_attribute("aria-sort") == "descending"
        # filter: every word must match
        box = driver.find_element(By.CSS_SELECTOR, "input.filter")
        box.send_keys("academic W4A4")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "table.leaderboard tbody tr") if r.is_displayed()]
        assert len(visible) == 2 and all("academic" in r.text and "W4A4" in r.text for r in visible)
        assert "2 of 8 runs" in driver.find_element(By.CLASS_NAME, "count").text
        # a run id opens its card
        link = visible[0].find_element(By.CSS_SELECTOR, "a.card-link")
        link.click()
        card = driver.find_element(By.ID, f"card-{link.text}")
        assert card.get_attribute("open") is not None and "Quantization Method" in card.text
        driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR", "WARNING")]
        assert not errors, errors
    finally:
        driver.quit()


def test_report_lists_runs_that_measured_latency_or_trained():
    """The report's latency/training section shows the figures of runs that have them, not an empty section."""
    from quantbench.report.html import render_report
    from quantbench.store.db import RunRow

    ptq = RunRow("a" * 16, "done", model="m", backend="tensorrt", w_bits=8, a_bits=8, metrics={"latency_ms": None})
    assert "No latency measurements" in render_report([ptq])
    timed = RunRow("b" * 16, "done", model="m", backend="fbgemm", w_bits=4, a_bits=4,
                   metrics={"latency_ms": 1.25, "train_seconds": 42.0})
    html = render_report([ptq, timed])
    assert "No latency measurements" not in html
    assert "<td>1.250</td><td>42.0</td>" in html and "b" * 16 in html
