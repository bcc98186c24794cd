"""report.html (every run) and compare.html, opened in headless Chromium: the images decode and the tables are there."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from deltatune.runs.compare import run_compare
from tests.test_cli import reviews, tiny_bert_dir, write_config  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI") == "true":  # CI installs it (.ci/run): never skip silently there
        pytest.fail("chromium is not installed: .ci/run installs it with apt-get install -y chromium", pytrace=False)
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

# Appended to a copy of the page: after the load event, write what the browser rendered into the DOM.
PROBE = """<script>window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: [...document.images].map(img => img.naturalWidth),
    tables: [...document.querySelectorAll("table")].map(t => t.rows.length),
    headings: [...document.querySelectorAll("h2")].map(h => h.textContent)});
  document.body.appendChild(probe);
});</script>"""
BROKEN_IMAGE = "<img alt='broken' src='data:image/png;base64,AAAA'>"


def render(page: Path, tmp_path: Path, extra: str = "") -> dict:
    """Load a copy of `page` (plus `extra` HTML) in headless Chromium; what the probe saw once it had loaded."""
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(page.read_text().replace("</body>", extra + PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom"]
    done = subprocess.run([CHROMIUM, *flags, copy.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout)
    assert found, f"chromium printed no probe (exit {done.returncode}): {done.stderr[-500:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert_dir, reviews):  # noqa: F811
    """A comparison of one tiny method: its run folder has report.html, the comparison compare.html."""
    folder = tmp_path_factory.mktemp("compare")
    out, _ = run_compare(write_config(folder, tiny_bert_dir, reviews), ["bitfit"],
                         ["train.epochs=1", "train.eval_every=2"], isolate=False)
    return out


@pytest.mark.slow  # a tiny training run and two browser starts
def test_reports_render_in_a_browser(compared, tmp_path):
    run_page = compared / "bitfit" / "report.html"
    seen = render(run_page, tmp_path)
    assert len(seen["images"]) == 1 and all(width > 0 for width in seen["images"])
    assert seen["headings"] == ["Results (test set, 12 examples)", "Run", "Classification diagnostics (test set, "
                                "12 examples)", "Training curves", "Config", "Environment"]
    results, summary, confusion, per_class, mistakes, environment = seen["tables"]
    assert results == 1 + 3 and summary == 7 and environment >= 9  # header + rows (the summary has no header)
    assert confusion == per_class == 1 + 2 and mistakes >= 1  # two classes
    text = run_page.read_text()
    for fact in (f"<td>python</td><td>{platform.python_version()}</td>", f"<td>torch</td><td>{torch.__version__}</td>",
                 f"<td>transformers</td><td>{transformers.__version__}</td>", "<td>cpu</td>", "<td>torch threads</td>",
                 "method: bitfit", "<td>accuracy</td>"):
        assert fact in text, fact

    seen = render(compared / "compare.html", tmp_path)
    assert len(seen["images"]) == 2 and all(width > 0 for width in seen["images"])
    assert seen["headings"] == ["Results (test set)", "Training curves", "Configs", "Environment"]
    assert seen["tables"][0] == 1 + 1  # header + the one method
    assert "<th>trainable %</th>" in (compared / "compare.html").read_text()

    assert render(run_page, tmp_path, BROKEN_IMAGE)["images"][-1] == 0  # the probe does see a broken image

