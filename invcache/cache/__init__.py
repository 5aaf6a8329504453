"""The cache: schema, writer/reader, inspection."""

import warnings

from invcache.cache.store import Cache, CacheCorruptError

# The lossy mode's BitRound filter comes from numcodecs; zarr warns on every open that it is
# outside the v3 specification. The cache records its codec, so the warning adds nothing.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def open_cache(path) -> Cache:
    """Open a cache for reading."""
    return Cache.open(path)


__all__ = ["Cache", "CacheCorruptError", "open_cache"]
