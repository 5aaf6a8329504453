"""DETR's detection loss: parity with HF transformers, the matcher's optimality, COCO targets, gradients.

What the HF parity compares (transformers 5.x, whose decoder feeds the LayerNorm'd state into
the next layer when ``auxiliary_loss=True``, unlike the official DETR; see docs/architecture.md):

1. the last layer: ``DetrForObjectDetection(pixel_values, labels=…)`` with ``auxiliary_loss=False``
   (its default) gives ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``cardinality_error`` and the
   weighted total, which must equal ours from our model on the same weights and images;
2. our intermediate predictions: ``aux_outputs[i]`` must equal HF's class and box heads applied
   to HF's raw decoder hidden state of layer ``i + 1`` through its decoder LayerNorm (official
   DETR's intermediate outputs, which HF with ``aux_loss`` off computes correctly);
3. the auxiliary terms: HF's loss function (``ForObjectDetectionLoss`` with ``auxiliary_loss=True``)
   applied to *our* predictions of every layer must give every term ``*_i`` and the total we give.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from safetensors.torch import save_file
from torchvision.ops import box_convert, generalized_box_iou

from invcache import build_detr
from invcache.errors import UsageError
from invcache.models import loss as loss_module
from invcache.models.loss import SetCriterion, coco_target
from invcache.models.matcher import HungarianMatcher

transformers = pytest.importorskip("transformers")
from test_parity import random_hf_detr  # noqa: E402  (needs transformers)

SIZE = (96, 128)
TOL = 1e-4


def random_targets(counts: list[int], seed: int, num_classes: int = 91) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in counts:
        centers = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centers, sizes], dim=1)})
    return targets


def hf_detr_with_distinct_queries(seed: int):
    """A random HF detr-tiny whose queries predict different boxes and classes.

    With HF's initialisation (std 0.02) every query of a random DETR predicts the same box and
    class to ~1e-7, so the matching would be decided by rounding and would pair query i with
    target i, hiding any mix-up of query and target indices. DETR's own Xavier initialisation,
    standard-normal query embeddings, sharp cross-attention and larger heads spread them out.
    """
    hf = random_hf_detr("detr-tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (hf.model.input_projection, hf.model.encoder, hf.model.decoder, hf.class_labels_classifier,
                       hf.bbox_predictor):
            for p in module.parameters():
                if p.dim() > 1:
                    torch.nn.init.xavier_uniform_(p, generator=g)
        hf.model.query_position_embeddings.weight.normal_(generator=g)
        for layer in hf.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(4)
            layer.encoder_attn.k_proj.weight.mul_(4)
        hf.bbox_predictor.layers[2].weight.mul_(3)
        hf.class_labels_classifier.weight.mul_(2)
    return hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_detr_with_distinct_queries(seed=3)
    path = tmp_path_factory.mktemp("hf-detr") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
    return hf, build_detr("detr-tiny", str(path))


def assert_terms_match(ours: dict, theirs: dict, names) -> None:
    for name in names:
        diff = abs(float(ours[name]) - float(theirs[name]))
        assert diff <= TOL, f"{name}: ours {float(ours[name]):.6g}, HF {float(theirs[name]):.6g}"


@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0]], ids=["mixed", "no-objects"])
def test_loss_matches_hf_detr(models, counts):
    hf, ours = models
    images = torch.randn(len(counts), 3, *SIZE, generator=torch.Generator().manual_seed(1))
    targets = random_targets(counts, seed=len(counts))
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    criterion = SetCriterion(num_classes=ours.config.num_classes)
    layers = ours.config.num_decoder_layers

    with torch.no_grad():
        outputs = ours.detection_outputs(images)
        reference = hf(pixel_values=images, labels=hf_labels, output_hidden_states=True)
        losses = criterion(outputs, targets)
        heads = ours(images, ["head.logits", "head.boxes"])
        # 2. HF's raw hidden state of decoder layer k is entry k (entry 0 = the zero queries, the last = normed).
        hf_aux = [(hf.class_labels_classifier(hf.model.decoder.layernorm(h)),
                   hf.bbox_predictor(hf.model.decoder.layernorm(h)).sigmoid())
                  for h in reference.decoder_hidden_states[1:layers]]

    assert torch.equal(outputs["pred_logits"], heads["head.logits"])
    assert torch.equal(outputs["pred_boxes"], heads["head.boxes"])
    # 1. the last layer, end to end
    final = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    assert_terms_match(losses, reference.loss_dict, final)
    assert abs(float(criterion.total({k: losses[k] for k in final})) - float(reference.loss)) <= TOL
    matches = criterion.matcher(outputs, targets)
    if sum(counts):
        assert any(not torch.equal(j, torch.arange(len(j))) for _, j in matches), "a trivial matching tests little"
    else:
        assert float(losses["loss_bbox"]) == float(losses["loss_giou"]) == 0.0
        assert float(losses["class_error"]) == 100.0
    # 2. the intermediate predictions
    assert len(outputs["aux_outputs"]) == layers - 1
    for aux, (logits, boxes) in zip(outputs["aux_outputs"], hf_aux):
        torch.testing.assert_close(aux["pred_logits"], logits, atol=TOL, rtol=0)
        torch.testing.assert_close(aux["pred_boxes"], boxes, atol=TOL, rtol=0)
    # 3. the auxiliary terms: HF's loss function on our predictions of every layer
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    aux_config = copy.deepcopy(hf.config)
    aux_config.auxiliary_loss = True
    stacked = [*outputs["aux_outputs"], outputs]
    hf_total, hf_terms, _ = ForObjectDetectionLoss(
        outputs["pred_logits"], hf_labels, images.device, outputs["pred_boxes"], aux_config,
        torch.stack([p["pred_logits"] for p in stacked]), torch.stack([p["pred_boxes"] for p in stacked]))
    assert set(hf_terms) <= set(losses) and set(losses) - set(hf_terms) == {"class_error"}
    assert_terms_match(losses, hf_terms, hf_terms)
    assert abs(float(criterion.total(losses)) - float(hf_total)) <= TOL


def brute_force_cost(logits, boxes, target) -> torch.Tensor:
    """(Q, n) matching costs, pair by pair: −p(class) + 5·L1 + 2·(−GIoU)."""
    probs = logits.softmax(-1)
    cost = torch.empty(len(logits), len(target["labels"]), dtype=torch.float64)
    for i, j in itertools.product(range(len(logits)), range(len(target["labels"]))):
        xyxy = box_convert(torch.stack([boxes[i], target["boxes"][j]]), "cxcywh", "xyxy")
        giou = generalized_box_iou(xyxy[:1], xyxy[1:])[0, 0]
        l1 = (boxes[i] - target["boxes"][j]).abs().sum()
        cost[i, j] = float(-probs[i, target["labels"][j]] + 5 * l1 - 2 * giou)
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_the_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    queries, classes = 5, 6
    counts = [seed % 4, (seed + 1) % 4, 3]  # 0–3 targets per image
    logits = torch.randn(len(counts), queries, classes, generator=g) * 2
    boxes = torch.cat([torch.rand(len(counts), queries, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(len(counts), queries, 2, generator=g) * 0.3 + 0.05], dim=-1)
    targets = random_targets(counts, seed=100 + seed, num_classes=classes - 1)
    matches = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert len(matches) == len(counts)
    for b, ((rows, cols), target) in enumerate(zip(matches, targets)):
        n = len(target["labels"])
        assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == n
        cost = brute_force_cost(logits[b], boxes[b], target)
        best = min(itertools.permutations(range(queries), n), key=lambda p: sum(cost[p[j], j] for j in range(n)))
        assert dict(zip(cols.tolist(), rows.tolist())) == dict(enumerate(best))


def test_matcher_refuses_all_zero_costs():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


def test_box_normalization_is_averaged_over_the_process_group(monkeypatch):
    """Official DETR: all-reduce the box count, divide by the world size, clamp to ≥ 1."""
    targets = random_targets([3, 1], seed=0)
    assert SetCriterion.normalizer(targets, torch.device("cpu")) == 4.0
    assert SetCriterion.normalizer(random_targets([0, 0], seed=0), torch.device("cpu")) == 1.0
    monkeypatch.setattr(loss_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loss_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(loss_module.dist, "all_reduce", lambda t: t.add_(6))  # the peer rank has 6 boxes
    assert SetCriterion.normalizer(targets, torch.device("cpu")) == 5.0


IMAGE = {"id": 7, "file_name": "000000000007.jpg", "height": 100, "width": 200}


def test_coco_target_drops_crowds_clamps_and_drops_degenerate_boxes():
    annotations = [
        {"bbox": [20, 10, 40, 30], "category_id": 3, "iscrowd": 0},
        {"bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 1},  # crowd: dropped
        {"bbox": [180, 90, 40, 20], "category_id": 90},  # partly outside: clamped to (180, 90)-(200, 100)
        {"bbox": [50, 50, 0, 10], "category_id": 5},  # zero width
        {"bbox": [250, 10, 20, 20], "category_id": 5},  # right of the image: zero width once clamped
        {"bbox": [-10, -10, 5, 5], "category_id": 5},  # above-left of the image: likewise
    ]
    target = coco_target(IMAGE, annotations, num_classes=91)
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [3, 90]
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.2, 0.25, 0.2, 0.3], [0.95, 0.95, 0.1, 0.1]]))

    empty = coco_target(IMAGE, [], num_classes=91)
    assert empty["labels"].shape == (0,) and empty["boxes"].shape == (0, 4)


@pytest.mark.parametrize("category", [91, -1])
def test_coco_target_refuses_a_category_the_model_has_no_class_for(category):
    annotations = [{"bbox": [20, 10, 40, 30], "category_id": category}]
    with pytest.raises(UsageError, match=r"^image 7 \(000000000007.jpg\): category") as error:
        coco_target(IMAGE, annotations, num_classes=91)
    assert "\n" not in str(error.value)


def test_loss_backpropagates_to_every_trained_part():
    model = build_detr("detr-tiny", "random:0").requires_grad_(True).train()
    criterion = SetCriterion(num_classes=model.config.num_classes)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    losses = criterion(model.detection_outputs(images), random_targets([2, 0], seed=4))
    total = criterion.total(losses)
    assert torch.isfinite(total) and set(losses) >= {"loss_ce_0", "loss_bbox_0", "loss_giou_0"}
    total.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name in ("class_embed.weight", "bbox_embed.layers.2.weight", "query_embed.weight",
                 "transformer.decoder.layers.0.linear1.weight", "input_proj.weight", "backbone.0.body.conv1.weight"):
        assert grads[name].abs().sum() > 0, name
