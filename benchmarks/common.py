"""Shared bits of the benchmark scripts: thread pinning, timing, the one-line JSON report."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_of(repeats: int, fn) -> float:
    """Smallest wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(name: str, **figures) -> None:
    print(json.dumps({"benchmark": name, **figures, "machine": machine()}), flush=True)


def synthetic_split(root, images: int, distinct: int, height_range, width_range, split: str = "val2017"):
    """A synthetic COCO ``split`` of ``images`` entries drawn over ``distinct`` generated JPEGs.

    Generating a JPEG costs more than extracting it, so long runs reuse files under new
    image ids; every entry is still decoded, resized, forwarded and written on its own.
    """
    import json

    from invcache.data import generate_coco

    path = generate_coco(root, split, num_images=min(images, distinct), height_range=height_range,
                         width_range=width_range)
    dataset = json.loads(path.read_text())
    originals = dataset["images"]
    next_id = max(record["id"] for record in originals) + 1
    for i in range(images - len(originals)):
        dataset["images"].append({**originals[i % len(originals)], "id": next_id + i})
    path.write_text(json.dumps(dataset))
    return root


# Colour photographs that ship inside installed wheels (no download): scikit-image's sample data and
# matplotlib's. They stand in for COCO where a figure depends on image content (codecs, JPEG decoding).
PHOTOGRAPHS = {
    "skimage": ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                "motorcycle_left.png", "motorcycle_right.png"),
    "matplotlib": ("grace_hopper.jpg",),
}


def photograph_paths() -> list:
    """The bundled photographs' files (8 colour photographs, 300×451 to 872×1000).

    Found without importing either package (only their files are needed, e.g. from wheels installed with
    ``--no-deps`` on a GPU machine).
    """
    from importlib.util import find_spec
    from pathlib import Path

    def package(name: str) -> Path:
        spec = find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"the bundled photographs need the {name} package installed")
        return Path(spec.submodule_search_locations[0])

    folders = {"skimage": package("skimage") / "data", "matplotlib": package("matplotlib") / "mpl-data" / "sample_data"}
    return [folders[package] / name for package, names in PHOTOGRAPHS.items() for name in names]


def photographs(height: int, width: int) -> list:
    """Each bundled photograph as RGB uint8 (height, width, 3), resized with PIL bilinear like the CPU path."""
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR))
            for path in photograph_paths()]


def photograph_split(root, images: int, split: str = "val2017", quality: int = 90):
    """A COCO-format ``split`` of ``images`` entries over the bundled photographs saved as JPEGs (no annotations).

    COCO's own files are baseline JPEGs of about 480×640; the PNGs are saved at ``quality`` at their own size.
    """
    import json
    from pathlib import Path

    from PIL import Image

    from invcache.data.synthetic import CATEGORIES

    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for path in photograph_paths():
        image = Image.open(path).convert("RGB")
        name = f"{path.stem}.jpg"
        image.save(folder / name, quality=quality)
        files.append((name, image.height, image.width))
    records = [{"id": i + 1, "file_name": files[i % len(files)][0], "height": files[i % len(files)][1],
                "width": files[i % len(files)][2]} for i in range(images)]
    annotations = Path(root) / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    path = annotations / f"instances_{split}.json"
    path.write_text(json.dumps({"images": records, "annotations": [],
                                "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]}))
    return path
