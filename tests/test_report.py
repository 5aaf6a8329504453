"""``invcache report``: the page of a real workspace opened in a real headless Chromium, and its defences.

The browser test needs Chromium (``make test`` installs Debian's package when it is absent) and
fails without it: CI must exercise it. Playwright drives the system's Chromium through
``executable_path``; it never downloads a browser of its own.
"""

import json
import os
import shutil
from dataclasses import asdict, fields

import pytest
from playwright.sync_api import sync_playwright

from invcache.analysis import stages
from invcache.analysis.report import API_ONLY, OPTION_NAMES, build_report, settings_command
from invcache.cli import cli, main
from invcache.errors import UsageError
from invcache.settings import AnalyzeSettings, ExtractSettings, TrainSettings

PNG = b"\x89PNG\r\n\x1a\n"
# What Chromium needs as root in a container, and no traffic of its own (Playwright adds --headless and a fresh
# temporary --user-data-dir).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail("Chromium is not installed; `make test` (its `browser` step) installs Debian's `chromium`")
    return path


@pytest.fixture(scope="module")
def report_root(analysis_workspace, tmp_path_factory):
    """A workspace with the session's caches and modules (linked, never written to) and a fresh stages analysis."""
    root = tmp_path_factory.mktemp("report-workspace")
    for folder in ("cache", "modules"):
        (root / folder).symlink_to(analysis_workspace / folder, target_is_directory=True)
    stages.run(AnalyzeSettings(workspace=root, n=3))
    return root


def test_the_report_of_a_real_workspace_loads_in_headless_chromium_offline(report_root, tmp_path):
    page_file = build_report(report_root)
    assert page_file == report_root / "report.html"
    results = json.loads((report_root / "analysis" / "stages" / "results.json").read_text())
    figures = results["files"]["figures"]
    assert figures == ["mse.png", "grid.png"]

    errors, requests = [], []
    screenshot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => ({alt: i.alt, complete: i.complete, "
                                   "width: i.naturalWidth, height: i.naturalHeight}))")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert errors == []
    assert [url for url in requests if not url.startswith("data:")] == [page_file.as_uri()]
    assert [image["alt"] for image in images] == figures
    assert all(image["complete"] and image["width"] > 0 and image["height"] > 0 for image in images), images
    assert screenshot.read_bytes().startswith(PNG)

    # what the page says: the analysis' figures, the caches' and modules' provenance and commands
    assert "stages" in text and "per_image.csv" in text
    for key, value in results["headline"].items():
        assert key in text and f"{value:.4g}" in text
    assert "baseline" in text and "±" in text
    assert "invcache extract --split val2017" in text and "--model detr-tiny --weights demo --size 128x160" in text
    assert "invcache extract --split train2017 --source synthetic" in text
    assert "invcache train backbone-inv" in text and "--from enc.1" in text and "--class-input scores" in text
    assert "--epochs 1 --batch-size 16" in text and "--width small" in text
    assert "images / valid" in text and "12 / 9" in text


def test_every_string_from_the_workspace_is_escaped(tmp_path):
    hostile = tmp_path / "analysis" / "x<y&z"
    hostile.mkdir(parents=True)
    (hostile / "results.json").write_text(json.dumps({
        "headline": {"<script>alert(1)</script>": "<img src=http://example.com/x.png>"},
        "files": {"tables": ["<b>.csv"], "figures": ["../../etc/passwd", "fake.png"]},
    }))
    (hostile / "fake.png").write_text("<svg onload=alert(1)>")
    module = tmp_path / "modules" / "m<&>\"'"
    module.mkdir(parents=True)
    (module / "best.json").write_text(json.dumps({
        "spec": {"name": "<i>", "inputs": ["enc.0"], "target": "input"},
        "settings": {"name": "backbone-inv", "out": "</pre><script>x()</script>"},
    }))
    (tmp_path / "cache" / "<not a cache>").mkdir(parents=True)

    page = build_report(tmp_path).read_text()
    assert "<script" not in page and "<img src=http" not in page and "<i>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "x&lt;y&amp;z" in page and "m&lt;&amp;&gt;&quot;&#x27;" in page
    assert "&lt;/pre&gt;&lt;script&gt;x()&lt;/script&gt;" in page
    assert "../../etc/passwd</code> refused" in page and "fake.png</code> unreadable: not a PNG" in page
    assert "&lt;not a cache&gt;" in page and "unreadable" in page


def test_a_corrupt_results_file_is_listed_as_unreadable_and_the_rest_still_shows(tmp_path):
    for name, text in [("broken", '{"headline": {"a": 1'), ("list", "[1, 2]"), ("binary", None)]:
        folder = tmp_path / "analysis" / name
        folder.mkdir(parents=True)
        path = folder / "results.json"
        path.write_bytes(b"\xff\xfe\x00" if text is None else text.encode())
    good = tmp_path / "analysis" / "good"
    good.mkdir()
    (good / "results.json").write_text(json.dumps({"headline": {"AP": 0.25}, "files": {"figures": ["gone.png"]}}))
    (tmp_path / "analysis" / "running").mkdir()  # no results.json yet: not finished

    page = build_report(tmp_path).read_text()
    assert page.count('class="unreadable">unreadable:') == 3
    assert "JSONDecodeError" in page and "JSON list, not an object" in page and "UnicodeDecodeError" in page
    assert "<td class=\"num\">0.25</td>" in page and "gone.png</code> unreadable: FileNotFoundError" in page
    assert "Not finished (no results.json): <code>running</code>" in page


def test_an_empty_workspace_gives_a_page_that_says_so_written_atomically(tmp_path):
    out = tmp_path / "elsewhere" / "page.html"
    assert build_report(tmp_path, out) == out
    page = out.read_text()
    assert "No analyses in this workspace yet" in page and "No caches" in page and "No trained modules" in page
    assert sorted(p.name for p in out.parent.iterdir()) == ["page.html"]  # no partial file left behind
    assert not (tmp_path / "report.html").exists()


def test_a_missing_root_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(UsageError, match="no workspace at"):
        build_report(tmp_path / "absent")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_commands_show_the_non_default_settings():
    extract = ExtractSettings(split="val2017", model="detr-tiny", weights="random:0", size=(64, 96), shard_size=8,
                              coco_root="/data/my coco", num_workers=0, writers=1, force=True)
    assert settings_command("invcache extract", ExtractSettings, json.loads(json.dumps(asdict(extract)))) == (
        "invcache extract --split val2017 --coco-root '/data/my coco' --model detr-tiny --weights random:0 "
        "--size 64x96 --num-workers 0 --shard-size 8 --force --writers 1")
    train = {**asdict(TrainSettings("backbone-inv", epochs=40, width="small", from_tap="enc.3", log_every=5)),
             "lr": 3e-3, "world_size": 1}  # the trainer records the learning rate it used (the module's own here)
    assert settings_command("invcache train", TrainSettings, train, positional=("name",)) == (
        "invcache train backbone-inv --from enc.3 --epochs 40 --width small  # set through the API: log_every=5")
    assert settings_command("invcache extract", ExtractSettings, None) is None


@pytest.mark.parametrize("command, settings_class, positional", [
    ("extract", ExtractSettings, {"split"}), ("train", TrainSettings, {"name"})])
def test_every_settings_field_has_the_option_the_report_writes(command, settings_class, positional):
    options = {opt for param in cli.commands[command].params for opt in param.opts}
    for field in fields(settings_class):
        if field.name in API_ONLY or (field.name in positional and command == "train"):
            continue
        assert "--" + OPTION_NAMES.get(field.name, field.name).replace("_", "-") in options, field.name
