"""The recipes in pipelines/ use only the public API and run (at a tiny size, so they cannot rot)."""

import ast
import importlib.util
from pathlib import Path

import invcache

PIPELINES = sorted((Path(__file__).parent.parent / "pipelines").glob("*.py"))


def public(module: str) -> bool:
    """``invcache`` itself and the analyses (``invcache.analysis.<name>.run``) are the public API (SPEC §9)."""
    if module in ("invcache", "invcache.analysis"):
        return True
    parts = module.split(".")
    return parts[:2] == ["invcache", "analysis"] and len(parts) == 3 and parts[2] not in ("common", "figures")


def test_pipelines_import_nothing_but_the_public_api():
    assert PIPELINES
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


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_recipe_runs_and_a_rerun_resumes_instead_of_redoing(tmp_path, capsys):
    demo = load("demo")
    root = tmp_path / "demo"
    results = demo.run(str(root), train_images=32, val_images=4, epochs=1, count=2, num_workers=0)
    assert set(results["stages"]) == set(invcache.STAGES) and results["images"] == 4
    assert (root / "analysis" / "stages" / "grid.png").is_file()
    metrics = {name: (root / "modules" / name / "metrics.jsonl").read_text() for name, _, _ in demo.MODULES}
    capsys.readouterr()
    demo.run(str(root), train_images=32, val_images=4, epochs=1, count=2, num_workers=0)
    out = capsys.readouterr().out
    assert out.count("0 shard(s) written") == 2
    assert {name: (root / "modules" / name / "metrics.jsonl").read_text() for name, _, _ in demo.MODULES} == metrics
