"""What a reviewer sees of one DICOM file: its header as rows, and a frame of its pixels as a PNG.

Core code (no Django): the review page calls it with the bytes of an original or a working copy.
The header rows carry the values as they are (this is for a person allowed to see the original);
sequences are nested rows with a depth, so the page can fold them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from sendit.dicomio.quiet import quiet

MAX_VALUE_CHARS = 200
MAX_ROWS = 5000
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


@dataclass(frozen=True)
class HeaderRow:
    tag: str  # "(0010,0010)"
    keyword: str
    vr: str
    value: str
    depth: int  # 0 for the top level; a sequence's items are one deeper
    sequence: bool = False  # a sequence's own row ("3 items"); the rows below it at depth+1 fold


def read(data: bytes) -> Dataset:
    """A data set from the bytes of a file (pixels included; never a path: the caller opens it)."""
    with quiet():
        return dcmread(io.BytesIO(data), force=True)


def _value(elem: object) -> str:
    vr = str(getattr(elem, "VR", "") or "")
    value = getattr(elem, "value", None)
    if vr in _BINARY_VRS or isinstance(value, bytes | bytearray):
        size = len(value) if isinstance(value, bytes | bytearray) else 0
        return f"<{size} bytes>"
    text = str(value) if value is not None else ""
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "…"


def header_rows(ds: Dataset) -> list[HeaderRow]:
    """The file meta, then the data set, in tag order; at most MAX_ROWS rows."""
    rows: list[HeaderRow] = []

    def walk(item: Dataset, depth: int) -> None:
        for elem in item:
            if len(rows) >= MAX_ROWS:
                return
            tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
            keyword = elem.keyword or ("private" if elem.tag.is_private else "")
            if elem.VR == "SQ":
                items = elem.value or []
                rows.append(HeaderRow(tag, keyword, "SQ", f"{len(items)} item(s)", depth, sequence=True))
                for sub in items:
                    walk(sub, depth + 1)
            elif elem.tag == 0x7FE00010:
                rows.append(HeaderRow(tag, keyword, str(elem.VR), "<pixel data>", depth))
            else:
                rows.append(HeaderRow(tag, keyword, str(elem.VR), _value(elem), depth))

    with quiet():
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            walk(meta, 0)
        walk(ds, 0)
    return rows


def frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


class PreviewError(Exception):
    """The pixels could not be shown; the text says why (no values)."""


def _window(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Grey levels to 0..255: the header's first window (C.11.2.1.2), else the frame's range."""
    data = frame.astype(np.float64)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    data = data * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, list | tuple) or hasattr(center, "__iter__") else center)
        w = float(width[0] if isinstance(width, list | tuple) or hasattr(width, "__iter__") else width)
    except (TypeError, ValueError, IndexError):
        c = w = float("nan")
    if not np.isfinite(w) or w <= 1:
        low, high = float(data.min()), float(data.max())
    else:
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    if high <= low:
        high = low + 1
    scaled = np.clip((data - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled


def render_png(ds: Dataset, frame: int = 0) -> bytes:
    """One frame as a PNG: grey images windowed, colour images as RGB (YBR converted)."""
    from PIL import Image

    if "PixelData" not in ds:
        raise PreviewError("no pixel data")
    count = frame_count(ds)
    if not 0 <= frame < count:
        raise PreviewError(f"frame {frame + 1} of {count} does not exist")
    try:
        with quiet():
            from pydicom.pixels import pixel_array

            array = pixel_array(ds, index=frame if count > 1 else None, as_rgb=True)
    except Exception as exc:
        raise PreviewError(f"pixel data could not be decoded ({type(exc).__name__})") from None
    if array.ndim == 3 and array.shape[-1] == 3:
        if array.dtype != np.uint8:
            top = float(array.max()) or 1.0
            array = (array.astype(np.float64) / top * 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(array), "RGB")
    elif array.ndim == 2:
        image = Image.fromarray(_window(array, ds), "L")
    else:
        raise PreviewError(f"pixel data of shape {array.shape} cannot be shown")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
