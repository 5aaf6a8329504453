"""Which files the device decoder may decode: a JPEG header read without decoding anything.

The device path must give what the CPU path (PIL, libjpeg-turbo) gives, or a recorded
failure where the CPU path records one. nvjpeg does not reject everything libjpeg handles
differently, so what it is not trusted with goes to the CPU path before it is tried:

- anything that is not a JPEG (PNG, GIF, an empty file): PIL reads many formats;
- 4-component JPEGs (CMYK, YCCK: PIL inverts Adobe CMYK), and 3-component JPEGs coded in RGB
  rather than YCbCr (an Adobe marker with transform 0, or components named R, G, B), whose
  colour conversion libjpeg decides from markers nvjpeg may ignore;
- precisions other than 8 bits, arithmetic coding, lossless and hierarchical JPEGs;
- a file that does not end with the end-of-image marker: truncated files fail on the CPU path
  (PIL loads fully), where nvjpeg may return a half-grey image without an error;
- images above PIL's decompression-bomb limit, which the CPU path refuses.

Baseline, extended and progressive Huffman JPEGs with 1 or 3 components are left to the
device; if its decoder still rejects one, that image goes to the CPU path then.
"""

from __future__ import annotations

from dataclasses import dataclass

SOI = b"\xff\xd8\xff"  # start of image, and the first byte of the next marker
EOI = b"\xff\xd9"
# Start-of-frame markers: 0xC0-0xCF but DHT (C4), JPG (C8) and DAC (CC), which are other segments.
_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DEVICE_FRAMES = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # markers without a length field
_SOS = 0xDA
_APP14 = 0xEE


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header (and an Adobe marker anywhere before the scan) says about a JPEG."""

    frame: int  # the SOFn marker's second byte
    precision: int
    height: int
    width: int
    component_ids: bytes
    adobe_transform: int | None  # None: no Adobe APP14 marker


def read_jpeg_header(data: bytes | bytearray | memoryview) -> JpegHeader | None:
    """The header of JPEG ``data``, or None if no frame header is found before the scan data.

    Reads every marker up to the first scan: an Adobe APP14 marker after the frame header is legal, and
    libjpeg still applies its colour transform.
    """
    view = memoryview(data)
    if bytes(view[:3]) != SOI:
        return None
    position, adobe, frame = 2, None, None
    while position + 4 <= len(view):
        if view[position] != 0xFF:
            return None
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        length = (view[position + 2] << 8) | view[position + 3]
        segment = view[position + 4:position + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == _APP14 and bytes(segment[:5]) == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker in _FRAMES and frame is None:
            if len(segment) < 6:
                return None
            components = segment[5]
            ids = bytes(segment[6:6 + 3 * components:3])
            if len(ids) != components:
                return None
            frame = (marker, segment[0], (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], ids)
        elif marker == _SOS:
            break
        position += 2 + length
    return None if frame is None else JpegHeader(*frame, adobe)


def device_refusal(data: bytes | bytearray | memoryview, max_pixels: int | None) -> str | None:
    """Why ``data`` goes to the CPU path instead of the device decoder; None if the device may decode it.

    ``max_pixels``: the CPU path's limit (twice PIL's ``MAX_IMAGE_PIXELS``, past which PIL raises),
    None for none.
    """
    if len(data) < 3 or bytes(memoryview(data)[:3]) != SOI:
        return "not a JPEG"
    header = read_jpeg_header(data)
    if header is None:
        return "no readable JPEG frame header"
    if header.frame not in DEVICE_FRAMES:
        return f"JPEG process SOF{header.frame - 0xC0} (arithmetic, lossless or hierarchical)"
    if header.precision != 8:
        return f"{header.precision}-bit JPEG"
    if len(header.component_ids) not in (1, 3):
        return f"{len(header.component_ids)} colour components (CMYK or YCCK)"
    if len(header.component_ids) == 3 and (header.adobe_transform == 0 or header.component_ids == b"RGB"):
        return "RGB-coded JPEG (no YCbCr)"
    if header.height == 0 or header.width == 0:
        return "no image size in the frame header"
    if max_pixels is not None and header.height * header.width > max_pixels:
        return "larger than PIL's decompression-bomb limit"
    if bytes(memoryview(data)[-2:]) != EOI:
        return "no end-of-image marker (truncated?)"
    return None
