"""The names of DETR's intermediate tensors (SPEC §1): the one place that defines them.

The model, the cache, the CLI's ``--layers`` and every API use these names. ``L`` is the
number of encoder (and decoder) layers of the model in hand.
"""

from __future__ import annotations

import fnmatch

from invcache.errors import UsageError

INPUT = "input"
BACKBONE_C5 = "backbone.c5"
HEAD_LOGITS = "head.logits"
HEAD_BOXES = "head.boxes"
DECODER_INPUT = "dec.0"

# Taps the data pipeline produces rather than the model.
DATA_TAPS = (INPUT,)
# Opt-in taps that ``all`` leaves out because of their size.
OPT_IN_TAPS = (BACKBONE_C5,)


def enc(k: int) -> str:
    return f"enc.{k}"


def dec(k: int) -> str:
    return f"dec.{k}"


def all_taps(num_encoder_layers: int, num_decoder_layers: int) -> list[str]:
    """Every storable tap, in forward order (``dec.0`` is all zeros and never stored)."""
    return [
        INPUT,
        BACKBONE_C5,
        *(enc(k) for k in range(num_encoder_layers + 1)),
        *(dec(k) for k in range(1, num_decoder_layers + 1)),
        HEAD_LOGITS,
        HEAD_BOXES,
    ]


def select_taps(spec: str, num_encoder_layers: int, num_decoder_layers: int) -> list[str]:
    """Resolve a ``--layers`` value (comma list of names and globs, or ``all``) to taps in forward order.

    ``all`` means every tap except the opt-in ``backbone.c5``. An unknown name or a glob
    that matches nothing raises :class:`UsageError` listing the valid names.
    """
    valid = all_taps(num_encoder_layers, num_decoder_layers)
    chosen: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            chosen.update(t for t in valid if t not in OPT_IN_TAPS)
            continue
        matches = [t for t in valid if fnmatch.fnmatchcase(t, part)]
        if not matches:
            raise UsageError(f"unknown tap {part!r}; valid taps: {', '.join(valid)} (or 'all')")
        chosen.update(matches)
    if not chosen:
        raise UsageError(f"no taps selected by {spec!r}; valid taps: {', '.join(valid)} (or 'all')")
    return [t for t in valid if t in chosen]


def tap_path(tap: str) -> str:
    """The cache array path of a tap: ``enc.3`` -> ``enc/3``, ``head.logits`` -> ``head/logits``."""
    return tap.replace(".", "/")


def layer_index(tap: str) -> int | None:
    """``k`` for ``enc.k`` / ``dec.k``, else None."""
    stage, _, index = tap.partition(".")
    if stage in ("enc", "dec") and index.isdigit():
        return int(index)
    return None
