import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("INVCACHE_DETR_URL_BASE", "http://127.0.0.1:9/detr/")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic COCO val2017 with every fault kind."""
    from invcache.data import FAULTS, generate_coco

    root = tmp_path_factory.mktemp("synthetic-coco")
    generate_coco(root, "val2017", num_images=12, seed=0, faults=FAULTS)
    return root


@pytest.fixture(scope="session")
def analysis_workspace(tmp_path_factory, synthetic_root):
    """A workspace the analyses can read: caches of every tap and briefly trained modules.

    train2017: 64 generated images; val2017: the 12 images of ``synthetic_root``, 3 of them
    unreadable (so every analysis must skip invalid rows). detr-tiny with the embedded default
    weights (``demo``), at the 128×160 it was trained at, so the analyses see real detections.
    Modules: the four of the stage chains, head-inv with softmax scores, and a per-layer
    B⁻¹ trained from enc.1.
    """
    from invcache.extraction import ExtractSettings, extract
    from invcache.training import TrainSettings, train

    root = tmp_path_factory.mktemp("analysis-workspace")
    common = dict(model="detr-tiny", weights="demo", size=(128, 160), shard_size=8, batch_size=8, num_workers=0)
    extract(ExtractSettings(split="train2017", source="synthetic", workspace=root, synthetic_images=64, **common))
    extract(ExtractSettings(split="val2017", coco_root=synthetic_root, workspace=root, **common))
    quick = dict(workspace=root, epochs=1, batch_size=16, width="small")
    for name, extra in [("backbone-inv", {}), ("encoder-inv", {}), ("decoder-inv", {}), ("head-inv", {}),
                        ("head-inv", {"class_input": "scores"}), ("backbone-inv", {"from_tap": "enc.1"})]:
        train(TrainSettings(name, **quick, **extra))
    return root
