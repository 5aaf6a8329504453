"""What a cache's root attributes mean for the runs that meet it: what must match, what is only recorded.

Two questions, two answers:

- **Resume** (the same ``extract`` command again): every setting that changes the arrays must
  match — the model (config and weights' sha256), preprocessing, perturbation, taps, shard
  size, the codec's ``keepbits``, schema, and the source's content (kind, split, annotation
  sha256, image count, image ids). The rest of the codec record is not a setting but what the
  cache's arrays hold (which taps the first batch showed not worth compressing, the codecs
  of the version that created it); a resume writes shards as each array's metadata says.
  Paths (the COCO folder, the annotation file, webdataset URLs, a checkpoint's file name)
  are recorded, not compared: a moved COCO folder resumes, and the
  annotation sha256 still guards the content.
- **Pairing** (inverse modules with a cache, a training cache with its validation cache):
  the DETR that made the cache and the preprocessing must match. Perturbations are recorded
  but not compared, so modules trained on clean images reconstruct perturbed ones.

Dates, software versions and failures are provenance only.
"""

from __future__ import annotations

import json

RESUME_KEYS = ("schema_version", "model", "preprocessing", "perturbation", "source", "taps", "shard_size", "codec",
               "image_ids_sha256")
PAIRING_KEYS = ("model", "preprocessing")
# Fields that say where something was found, not what it was.
_MODEL_PATH_FIELDS = ("weights",)
_SOURCE_PATH_FIELDS = ("root", "annotation_file", "urls")


def resume_settings(attrs: dict) -> dict:
    """The settings of a cache (or of a run about to write one) that a resume must reproduce."""
    settings = {key: attrs.get(key) for key in RESUME_KEYS}
    settings["model"] = _without(settings["model"], _MODEL_PATH_FIELDS)
    settings["source"] = _without(settings["source"], _SOURCE_PATH_FIELDS)
    if isinstance(settings["codec"], dict):
        settings["codec"] = {"keepbits": settings["codec"].get("keepbits")}
    return settings


def pairing_fingerprint(attrs: dict) -> dict:
    """What modules trained on a cache share with every cache they may be used with."""
    model = attrs["model"]
    return {
        "model": {"name": model["model"], "config": model["config"], "weights_sha256": model["weights_sha256"]},
        "preprocessing": attrs["preprocessing"],
    }


def resume_differences(existing: dict, new: dict) -> list[str]:
    return differences(resume_settings(existing), resume_settings(new), RESUME_KEYS)


def pairing_differences(fingerprint: dict, attrs: dict) -> list[str]:
    return differences(fingerprint, pairing_fingerprint(attrs), PAIRING_KEYS)


def _without(record: dict | None, fields: tuple[str, ...]) -> dict | None:
    return None if record is None else {k: v for k, v in record.items() if k not in fields}


def differences(old: dict, new: dict, keys: tuple[str, ...]) -> list[str]:
    """``key.field: old -> new`` for every recorded setting that differs (compared as JSON)."""
    diffs = []
    for key in keys:
        before, after = json.loads(json.dumps(old.get(key))), json.loads(json.dumps(new.get(key)))
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            diffs += [f"{key}.{sub}: {before.get(sub)!r} -> {after.get(sub)!r}"
                      for sub in sorted(set(before) | set(after)) if before.get(sub) != after.get(sub)]
        else:
            diffs.append(f"{key}: {before!r} -> {after!r}")
    return diffs
