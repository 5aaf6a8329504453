"""The recipes in pipelines/ use only the public API and run (at a tiny size, so they cannot rot)."""

import ast
import json
import sys
from pathlib import Path

import pytest

import invcache

PIPELINES_DIR = Path(__file__).parent.parent / "pipelines"
PIPELINES = sorted(PIPELINES_DIR.glob("*.py"))
LOCAL = {p.stem for p in PIPELINES}  # the recipes may import each other


def public(module: str) -> bool:
    """``invcache`` itself and the analyses (``invcache.analysis.<name>.run``) are the public API (SPEC §9)."""
    if module in ("invcache", "invcache.analysis") or module in LOCAL:
        return True
    parts = module.split(".")
    return parts[:2] == ["invcache", "analysis"] and len(parts) == 3 and parts[2] not in ("common", "figures")


def test_pipelines_import_nothing_but_the_public_api():
    assert {"demo", "paper", "main_job"} <= LOCAL
    for path in PIPELINES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("invcache") or public(alias.name), f"{path.name}: {alias.name}"
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "invcache":
                assert public(node.module), f"{path.name}: from {node.module} import …"
                if node.module == "invcache":
                    assert all(a.name in invcache.__all__ for a in node.names), path.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "invcache":
                assert node.attr in invcache.__all__, f"{path.name}: invcache.{node.attr} is not public"


@pytest.fixture
def recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(PIPELINES_DIR))
    import demo
    import paper

    yield demo, paper
    for name in ("demo", "paper", "main_job"):
        sys.modules.pop(name, None)


def a_category_of(coco_root, split):
    """The name of a category with an object in the first image of a generated split (the colour study needs one)."""
    dataset = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
    first = min(image["id"] for image in dataset["images"])
    category = next(a["category_id"] for a in dataset["annotations"] if a["image_id"] == first)
    return next(c["name"] for c in dataset["categories"] if c["id"] == category)


def test_the_demo_runs_every_analysis_and_a_rerun_resumes_instead_of_redoing(tmp_path, recipes, monkeypatch):
    from invcache.data import generate_coco

    demo, _ = recipes
    root = tmp_path / "demo"
    lines: list[str] = []
    job = demo.demo(str(root), train_images=32, val_images=4, epochs=1, num_workers=0)
    generate_coco(tmp_path / "same", "val2017", num_images=4)  # deterministic: the demo's own val2017
    job.color_options = {"categories": [a_category_of(tmp_path / "same", "val2017")], "min_area": 0.001}
    report = job.run(say=lines.append)
    assert report == root / "report.html" and report.is_file()
    for name in ("stages", "inter-layer", "onehot", "ap", "grayscale"):
        assert json.loads((root / "analysis" / name / "results.json").read_text())["images"] == 4, name
    assert (root / "analysis" / "color" / "results.json").is_file()
    page = report.read_text()
    assert "<h3>grayscale</h3>" in page and "<h3>color</h3>" in page and "val2017+hue-identity@" in page
    metrics = {p: p.read_text() for p in (root / "modules").glob("*/metrics.jsonl")}
    assert len(metrics) == 5
    lines.clear()
    from invcache.models.detr import DETR

    forwards = []
    forward = DETR.forward
    monkeypatch.setattr(DETR, "forward", lambda self, *a, **k: forwards.append(1) or forward(self, *a, **k))
    job.run(say=lines.append)
    assert sum("0 shard(s) written" in line for line in lines) == 2
    assert forwards == []  # the perturbed caches too are complete: no DETR work at all
    assert {p: p.read_text() for p in (root / "modules").glob("*/metrics.jsonl")} == metrics


def test_the_paper_recipe_runs_on_a_coco_folder_at_a_tiny_size(tmp_path, recipes):
    from invcache.data import generate_coco

    _, paper = recipes
    coco = tmp_path / "coco"
    generate_coco(coco, "train2017", num_images=4)
    generate_coco(coco, "val2017", num_images=3)
    report = paper.paper(str(tmp_path / "paper"), str(coco), weights="random:0", limit=4, epochs=1, size=(64, 96),
                         num_workers=0, color_options={"categories": [a_category_of(coco, "val2017")],
                                                       "min_area": 0.001}).run(say=lambda line: None)
    assert report.is_file()
    stages = json.loads((tmp_path / "paper" / "analysis" / "stages" / "results.json").read_text())
    assert stages["images"] == 3 and stages["provenance"]["cache"]["model"]["model"] == "detr-r50"
