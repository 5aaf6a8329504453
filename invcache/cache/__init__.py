"""The cache: schema, writer/reader, inspection."""

import warnings

# The lossy mode's BitRound filter comes from numcodecs; zarr warns on every open that it is
# outside the v3 specification. The cache records its codec, so the warning adds nothing.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")
