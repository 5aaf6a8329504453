"""Which taps a cache stores without a compressor, measured on the first batch of the extraction.

SPEC §3: codecs are chosen per tap by what they achieve, and a tap that Blosc shrinks by less than
:data:`~invcache.cache.schema.COMPRESSION_WORTHWHILE` (about 1.1×) is stored raw, its crc32c kept.
What compresses depends on the weights and the images (on DETR-R50 the encoder taps compress
1.10× and the decoder taps about 1.6×; on the embedded default, whose rows are a few KB, no
activation tap gains), so extraction measures every tap on its first batch with the cache's own
Blosc settings (:func:`~invcache.cache.schema.blosc`), one chunk per image and shuffled by 2-byte
elements as the cache stores it, and records the outcome in the codec record.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from invcache.cache import schema as S
from invcache.taps import INPUT


def blosc_ratios(rows: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Raw over Blosc-compressed bytes of each float tap's rows, each row compressed alone (one chunk per image)."""
    blosc = S.blosc()
    ratios = {}
    for tap, values in rows.items():
        if tap == INPUT or not len(values):
            continue
        values = np.ascontiguousarray(values, dtype=S.FLOAT_DTYPE)
        stored = sum(len(blosc.encode(row)) for row in values)  # fp16 rows: shuffled by 2-byte elements
        ratios[tap] = values.nbytes / stored
    return ratios


def choose_uncompressed(rows: Mapping[str, np.ndarray]) -> list[str]:
    """The taps of ``rows`` that Blosc shrinks by less than ``COMPRESSION_WORTHWHILE``, in the order given."""
    return [tap for tap, ratio in blosc_ratios(rows).items() if ratio < S.COMPRESSION_WORTHWHILE]
