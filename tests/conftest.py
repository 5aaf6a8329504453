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
