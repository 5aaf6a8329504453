import pytest

from invcache import taps as T
from invcache.errors import UsageError
from invcache.models import get_config


def test_all_excludes_backbone_c5_and_keeps_forward_order():
    assert T.select_taps("all", 2, 2) == [
        "input", "enc.0", "enc.1", "enc.2", "dec.1", "dec.2", "head.logits", "head.boxes"
    ]
    assert "backbone.c5" in T.select_taps("all,backbone.c5", 6, 6)


def test_globs_and_lists_resolve_in_forward_order():
    assert T.select_taps("head.*,enc.*", 2, 2) == ["enc.0", "enc.1", "enc.2", "head.logits", "head.boxes"]
    assert T.select_taps("dec.6, head.*", 6, 6) == ["dec.6", "head.logits", "head.boxes"]


@pytest.mark.parametrize("spec", ["enc.7", "decoder.1", "head.*x", "", " , "])
def test_unknown_names_list_the_valid_ones(spec):
    with pytest.raises(UsageError) as err:
        T.select_taps(spec, 6, 6)
    assert "enc.6" in str(err.value) and "head.boxes" in str(err.value)


def test_paths_and_indices():
    assert T.tap_path("enc.3") == "enc/3"
    assert T.tap_path("head.logits") == "head/logits"
    assert T.layer_index("dec.4") == 4 and T.layer_index("head.boxes") is None


def test_tap_shapes_follow_spec_table():
    r50 = get_config("detr-r50")
    size = (480, 640)
    assert r50.tap_shape("input", size) == (480, 640, 3)
    assert r50.tap_shape("backbone.c5", size) == (300, 2048)
    assert r50.tap_shape("enc.0", size) == (300, 256)
    assert r50.tap_shape("dec.6", size) == (100, 256)
    assert r50.tap_shape("head.logits", size) == (100, 92)
    assert r50.tap_shape("head.boxes", size) == (100, 4)
    assert get_config("detr-r50-dc5").tap_shape("enc.6", size) == (1200, 256)
    with pytest.raises(UsageError):
        r50.tap_shape("enc.7", size)
