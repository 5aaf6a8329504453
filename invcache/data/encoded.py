"""One image of a source as its file's bytes, not yet decoded, with the CPU path's way of reading it.

The device decode path (``invcache.data.device_decode``) reads files as bytes in threads and
decodes them on the model's device; any image it does not decode itself is read by
``cpu_sample``, which is exactly what the CPU path's DataLoader item for that image would be,
failures (and their messages) included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class EncodedImage:
    row: int
    image_id: int
    data: bytes | bytearray | None  # the file's bytes; None when they could not be read (cpu_sample says why)
    cpu_sample: Callable[[], dict]  # the CPU path: a ``Sample.as_dict()`` of this image
