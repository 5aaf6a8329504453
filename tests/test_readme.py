"""The README's Python examples run as written (offline: synthetic data, the embedded default weights)."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:  # one namespace: later examples build on earlier ones, as in a notebook
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["pixels"].shape == (4, 3, 128, 160)
    assert (tmp_path / "runs" / "modules" / "encoder-inv" / "best.json").is_file()
