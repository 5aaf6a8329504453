"""The cache: schema, writer/reader, inspection."""

import os

from invcache.cache.store import Cache, CacheCorruptError
from invcache.cache.view import TapView


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a cache for reading.

    The returned :class:`Cache` gives ``.taps``, ``.attrs``, ``len()`` (images), ``cache[tap]``
    (a lazy :class:`TapView`), ``.image_ids``, ``.valid``, ``.mean_image`` and
    ``.as_batches(taps, batch_size, ...)`` (what training reads) and ``.as_dataset(taps, ...)``.
    """
    return Cache.open(path)


__all__ = ["Cache", "CacheCorruptError", "TapView", "open_cache"]
