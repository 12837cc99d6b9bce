"""Finding burned-in text with OCR: Debian's tesseract, driven by pytesseract.

The approach is Presidio's DICOM image redactor's (microsoft/presidio, ``DicomImageRedactorEngine``):
scale the frame to 8 bits, give tesseract dark text on a light background with a white border (text
touching the edge is otherwise missed), and blank each box it reads with a margin. Unlike Presidio we
blank *every* line of text, not only the words a PHI recogniser names: on a medical image any text may
identify, and blanking a harmless word costs little. And we do not OCR the frame as it is, which
fails on text over a picture (global thresholding takes the picture with the text), but
:func:`_views` of it where text stands out whatever is beneath, with the strokes too large to be
glyphs taken out (the lines of a drawing make tesseract's layout analysis miss the text beside them).

What counts as text: a word with enough letters or digits read with enough confidence
(:data:`TEXT_WORDS`; tesseract reads noise as short, unsure words). Its box is grown over the other
words on its line whatever their confidence, and along the line over ink tesseract did not read (a
name it cannot read next to a date it can): :func:`read_frame`.

Time per image is bounded: a frame is scaled down to at most ``max_side`` pixels on its longer side;
all the views of a frame go to one tesseract call (each call costs ~0.1 s to start); a cine is read
on its first frame, or every Nth; tesseract runs on one thread (``OMP_THREAD_LIMIT=1``: the relay's
parallelism is its worker processes) with a time-out.

The OCR image and tesseract's words (which may be PHI) are written only inside a private temporary
folder (mode 0700), removed after each call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from pydicom.dataset import Dataset

Box = tuple[int, int, int, int]  # x0, y0, x1, y1; end-exclusive
ON_TEXT_CHOICES = ("blank", "quarantine")

#: (letters or digits in a word, least tesseract confidence 0-100) from which a word counts as text.
#: Measured on generated images (benchmarks/bench_ocr.py): noise read as letters is short and unsure
#: ("ae", "oe", "eee" at 20-60), while a line of real text has a word that passes.
#: A word of 8 or more is text whatever tesseract's confidence: noise never reads that long, while
#: tesseract gives a correctly read name over ultrasound speckle a confidence of 0 (measured).
TEXT_WORDS = ((2, 85.0), (3, 75.0), (4, 50.0), (6, 30.0), (8, 0.0))
#: Margin around a line of text, as a share of its height (anti-aliasing, accents, descenders).
MARGIN = 0.4
#: Side of the square of the top-hat filters, in OCR pixels: strokes thinner than this stand out.
STROKE = 9
#: (height, width) in OCR pixels above which a connected stroke is not a glyph (or a few touching).
GLYPH = (48, 200)
#: The brightest share of a frame's range that the ink view keeps.
INK_BAND = 0.04
#: Grey level (0-255) under which a pixel of a view is ink, when growing a box along its line.
INK_LEVEL = 192
#: Lines of ink stacked above or below a line of text that are taken for text too, each way.
STACK = 6
#: Frames whose longer side is at most this many pixels are read at twice their size.
SMALL_SIDE = 400
#: Heights (in OCR pixels, least and most) of the glyphs that :func:`small_glyph_row` looks for, and
#: how many side by side make a row: text up to this size may go unread at the frame's own size.
SMALL_GLYPH = (4, 14)
SMALL_ROW = 5
#: Seconds one tesseract call may take before the image is quarantined.
TIMEOUT_SECONDS = 30
_PAD = 16  # white border and gap between views, in OCR pixels
#: tesseract's page segmentation modes, by reading: sparse text with orientation detection first
#: (annotations, not paragraphs; mode 11 alone lets a large curve swallow the text beside it), then,
#: reading a blanked image again, sparse text (11): the two miss different lines (measured).
PAGE_MODES = (12, 11)
# the LSTM engine; our views already have the polarity
_CONFIG = "--oem 1 -c tessedit_do_invert=0 -c tessedit_create_tsv=1"


class OcrUnavailable(Exception):
    """OCR cannot run here (tesseract or pytesseract missing, tesseract failed or timed out)."""


class UnreadableFrame(ValueError):
    """A frame could not be decoded for OCR; the text names the error's type, never a value."""


@dataclass(frozen=True)
class OcrSettings:
    """The OCR_* configuration keys: whether flagged images are OCR'd, what happens when text is
    found (``blank`` its lines, or ``quarantine``), which frames of a multi-frame image are read (0:
    the first only; N: frames 0, N, 2N, ...), the longest side a frame is scaled down to, and how
    sure (0-1) a reading that found no text must be before the image is released as it is
    (:attr:`OcrResult.confidence`; a doubtful reading is read again closer, then quarantined)."""

    enabled: bool = True
    on_text: str = "quarantine"
    every_nth_frame: int = 0
    max_side: int = 1024
    release_confidence: float = 0.35

    def __post_init__(self) -> None:
        if self.on_text not in ON_TEXT_CHOICES:
            raise ValueError(f"OCR_ON_TEXT must be one of {', '.join(ON_TEXT_CHOICES)}")
        if self.every_nth_frame < 0:
            raise ValueError("OCR_EVERY_NTH_FRAME must be 0 (the first frame only) or more")
        if self.max_side < 64:
            raise ValueError("OCR_MAX_SIDE must be at least 64 pixels")
        if not 0.0 <= self.release_confidence <= 1.0:
            raise ValueError("OCR_RELEASE_CONFIDENCE must be between 0 and 100 (per cent)")

    def frames(self, count: int) -> range:
        """The indexes of the frames to read of an image with ``count`` frames."""
        if count <= 1 or self.every_nth_frame == 0:
            return range(min(count, 1))
        return range(0, count, self.every_nth_frame)


@dataclass(frozen=True)
class TextLine:
    """Text found: its box in the image's pixels (margin included; the views' boxes of one line, or
    of lines close together, merged), the first frame it was read on and the confidence (0-1) of its
    best word."""

    box: Box
    frame: int
    confidence: float


@dataclass(frozen=True)
class OcrResult:
    """What OCR saw on the frames it read. ``confidence`` is, with text, that of the best text word;
    without text, how sure we are there is none: 1 minus the best confidence of anything tesseract
    read as letters or digits (1.0 when it read nothing)."""

    lines: tuple[TextLine, ...]
    frames: tuple[int, ...]
    confidence: float
    seconds: float = field(default=0.0, compare=False)
    #: Where a closer look is due, as (frame, first row, row after the last): the rows of what was
    #: half-read as letters (above the doubt the settings allow) and of rows of small glyphs not read.
    unsure: tuple[tuple[int, int, int], ...] = field(default=(), compare=False)

    @property
    def found(self) -> bool:
        return bool(self.lines)

    @property
    def regions(self) -> tuple[Box, ...]:
        """The boxes to blank (in every frame: a cine shows its text in the same place)."""
        return tuple(line.box for line in self.lines)

    def summary(self) -> str:
        """For the image's record; never what was read (that may be PHI)."""
        frames = f"{len(self.frames)} frame" + ("s" if len(self.frames) != 1 else "")
        if self.found:
            return f"text detected by OCR: {len(self.lines)} region(s) on {frames}, confidence {self.confidence:.2f}"
        return f"no text found by OCR on {frames}, confidence {self.confidence:.2f}"


@cache
def unavailable_reason() -> str:
    """Empty when OCR can run here; otherwise why not (looked up once per process)."""
    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return "OCR unavailable: pytesseract not installed"
    if shutil.which("tesseract") is None:
        return "OCR unavailable: tesseract not installed"
    return ""


def find_text(
    ds: Dataset, settings: OcrSettings, reading: int = 0, closer: Sequence[tuple[int, int, int]] | None = None
) -> OcrResult:
    """OCR the frames of ``ds`` that ``settings`` selects (``reading``: how many times this image has
    been read before; it picks the page segmentation mode, :data:`PAGE_MODES`). ``closer``: read
    instead only these rows (:attr:`OcrResult.unsure` of a first reading; empty: the whole frames)
    at twice the size — the second look at a doubtful reading, see :func:`read_frame`. Raises
    :class:`OcrUnavailable` when tesseract cannot run and :class:`UnreadableFrame` when the pixel
    data cannot be decoded."""
    reason = unavailable_reason()
    if reason:
        raise OcrUnavailable(reason)
    started = time.perf_counter()
    count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = sorted({frame for frame, _, _ in closer}) if closer else list(settings.frames(count))
    lines: list[TextLine] = []
    unsure: list[tuple[int, int, int]] = []
    noise = 0.0
    mode = PAGE_MODES[reading % len(PAGE_MODES)]
    for index in frames:
        values = frame_values(ds, index if count > 1 else None)
        if closer is None:
            found, frame_noise, rows = read_frame(values, settings.max_side, mode, 1.0 - settings.release_confidence)
            unsure += [(index, top, bottom) for top, bottom in rows]
        else:
            spans = [(top, bottom) for frame, top, bottom in closer if frame == index] or [(0, values.shape[0])]
            found, frame_noise = _read_rows_closer(values, spans, settings.max_side, mode)
        noise = max(noise, frame_noise)
        lines = _merged(lines + [TextLine(box, index, confidence) for box, confidence in found])
    confidence = max(line.confidence for line in lines) if lines else 1.0 - noise
    seconds = time.perf_counter() - started
    return OcrResult(tuple(lines), tuple(frames), round(confidence, 2), seconds, tuple(sorted(set(unsure))))


def _read_rows_closer(
    values: np.ndarray, spans: Sequence[tuple[int, int]], max_side: int, mode: int
) -> tuple[list[tuple[Box, float]], float]:
    """Read the rows ``spans`` of a frame (each with a line height more above and below) at twice
    the size: cut out, stacked with a gap, read as one image, the boxes mapped back to the frame."""
    rows = values.shape[0]
    grown = sorted((max(0, top - (bottom - top)), min(rows, bottom + (bottom - top))) for top, bottom in spans)
    merged: list[list[int]] = []
    for top, bottom in grown:
        if merged and top <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], bottom)
        else:
            merged.append([top, bottom])
    gap = np.full((_PAD, values.shape[1]), float(np.median(values)), dtype=np.float32)
    pieces: list[np.ndarray] = []
    places: list[tuple[int, int, int]] = []  # (first row in the cut-out, first row in the frame, rows)
    at = 0
    for top, bottom in merged:
        pieces += [np.asarray(values[top:bottom], dtype=np.float32), gap]
        places.append((at, top, bottom - top))
        at += bottom - top + _PAD
    found, noise, _ = read_frame(np.vstack(pieces), max_side, mode, closer=True)
    mapped: list[tuple[Box, float]] = []
    for (x0, y0, x1, y1), confidence in found:
        middle = (y0 + y1) // 2
        start, top, _ = next((place for place in places if place[0] <= middle < place[0] + place[2] + _PAD), places[-1])
        mapped.append(((x0, max(0, y0 + top - start), x1, min(rows, y1 + top - start)), confidence))
    return mapped, noise


def _merged(lines: list[TextLine]) -> list[TextLine]:
    """Overlapping boxes as one (each view, and each frame of a cine, finds the same line)."""
    merged: list[TextLine] = []
    for line in lines:
        box, frame, confidence = line.box, line.frame, line.confidence
        overlapping = True
        while overlapping:
            overlapping = False
            for other in merged:
                a = other.box
                if a[0] < box[2] and box[0] < a[2] and a[1] < box[3] and box[1] < a[3]:
                    merged.remove(other)
                    box = (min(a[0], box[0]), min(a[1], box[1]), max(a[2], box[2]), max(a[3], box[3]))
                    frame, confidence = min(frame, other.frame), max(confidence, other.confidence)
                    overlapping = True
                    break
        merged.append(TextLine(box, frame, confidence))
    return merged


def read_frame(
    values: np.ndarray, max_side: int, mode: int = PAGE_MODES[0], doubt_above: float = 1.0, closer: bool = False
) -> tuple[list[tuple[Box, float]], float, list[tuple[int, int]]]:
    """OCR one 2-D frame (any numeric type): the text lines found (box in the frame's pixels, margin
    included; confidence 0-1); the best confidence (0-1) of the words that did not count; and the
    rows where a closer look is due: those of words half-read as letters with a confidence above
    ``doubt_above``, and those of rows of small glyphs not read (:func:`glyph_rows`; they make the
    best confidence 1: nothing says there is no text). ``closer`` reads the frame at twice the size,
    in the full-size views only: text of 8-14 pixels that tesseract misses at its own size
    (measured); the larger text those views miss was read by the first look.

    1. Scale the frame to ``max_side`` (:func:`_scaled`) and to 8 bits.
    2. Make the views (:func:`_views`) and stack them into one image, white between them.
    3. OCR it once, in page segmentation ``mode``; assign each word to its view.
    4. Per view, keep the words that count as text with their neighbours on the line
       (:func:`_text_boxes`); grow each box over the ink further along its line (:func:`_along_line`)
       and take the lines of ink stacked above and below it (:func:`_stacked`).
    5. Map the boxes back to the frame, with a margin.
    """
    rows, columns = values.shape
    image, scale = _scaled(values, max_side, 2.0 if closer else 1.0)
    views = _views(image, levels=1 if closer else 3)
    if not views:
        return [], 0.0, []
    width = max(view.shape[1] for view, _ in views) + 2 * _PAD
    starts: list[int] = []
    blocks = [np.full((_PAD, width), 255, np.uint8)]
    for view, _ in views:
        block = np.full((view.shape[0] + _PAD, width), 255, np.uint8)
        block[: view.shape[0], _PAD : _PAD + view.shape[1]] = view
        starts.append(_PAD + sum(b.shape[0] for b in blocks[1:]))
        blocks.append(block)
    words_by_view: list[list[tuple[Box, float, str]]] = [[] for _ in views]
    for (left, top, w, h), confidence, text in _tesseract(np.vstack(blocks), mode):
        middle = top + h // 2
        index = max((i for i, start in enumerate(starts) if start <= middle), default=0)
        y = top - starts[index]
        words_by_view[index].append(((left - _PAD, y, left - _PAD + w, y + h), confidence, text))
    found: list[tuple[Box, float]] = []
    unsure: list[tuple[int, int]] = []
    noise = 0.0
    for (view, factor), words in zip(views, words_by_view, strict=True):
        boxes, view_noise = _text_boxes(words)
        noise = max(noise, view_noise)
        per_pixel = scale * factor  # view pixels per frame pixel
        doubts = [
            (box[1], box[3])
            for box, confidence, text in words
            if confidence / 100.0 > doubt_above and not is_text(text, confidence) and any(c.isalnum() for c in text)
        ]
        if not closer and factor == 1.0 and not boxes:
            small = glyph_rows(view)
            doubts += small
            noise = 1.0 if small else noise  # nothing says there is no text: the caller reads it closer
        unsure += [(max(0, int(y0 / per_pixel)), min(rows, int(np.ceil(y1 / per_pixel)))) for y0, y1 in doubts]
        ink = view < INK_LEVEL
        lines = [(_along_line(ink, box), confidence) for box, confidence in boxes]
        lines += [(_along_line(ink, extra), confidence) for box, confidence in lines for extra in _stacked(ink, box)]
        for (x0, y0, x1, y1), confidence in lines:
            margin = max(3.0, MARGIN * (y1 - y0))
            found.append(
                (
                    (
                        max(0, int((x0 - margin) / per_pixel)),
                        max(0, int((y0 - margin) / per_pixel)),
                        min(columns, int(np.ceil((x1 + margin) / per_pixel))),
                        min(rows, int(np.ceil((y1 + margin) / per_pixel))),
                    ),
                    confidence,
                )
            )
    return found, noise, unsure


def is_text(word: str, confidence: float) -> bool:
    """Whether a word tesseract read with ``confidence`` (0-100) counts as text (:data:`TEXT_WORDS`)."""
    letters = sum(ch.isalnum() for ch in word)
    return any(letters >= chars and confidence >= least for chars, least in TEXT_WORDS)


def _text_boxes(words: Sequence[tuple[Box, float, str]]) -> tuple[list[tuple[Box, float]], float]:
    """The boxes of the words that count as text, each grown over the words beside it on its line
    whatever their confidence (tesseract often splits a name it half-reads), with the best confidence
    (0-1) in each; and the best confidence of the words with letters that did not count."""
    counts = [is_text(text, confidence) for _, confidence, text in words]
    noise = max(
        (conf for (_, conf, text), ok in zip(words, counts, strict=True) if not ok and any(c.isalnum() for c in text)),
        default=0.0,
    )
    taken = [False] * len(words)
    result: list[tuple[Box, float]] = []
    for i, ok in enumerate(counts):
        if not ok or taken[i]:
            continue
        (x0, y0, x1, y1), best, _ = words[i]
        taken[i] = grown = True
        while grown:
            grown = False
            for j, ((a0, b0, a1, b1), confidence, _) in enumerate(words):
                if taken[j]:
                    continue
                same_line = min(y1, b1) - max(y0, b0) > 0.4 * min(y1 - y0, b1 - b0)
                same_line = same_line and max(b1 - b0, y1 - y0) <= 1.5 * min(b1 - b0, y1 - y0)  # one size
                reach = (3 if counts[j] else 2) * max(y1 - y0, b1 - b0)  # between two text words is text
                if same_line and a0 - x1 < reach and x0 - a1 < reach:
                    x0, y0, x1, y1 = min(x0, a0), min(y0, b0), max(x1, a1), max(y1, b1)
                    taken[j] = grown = True
                    best = max(best, confidence) if counts[j] else best
        result.append(((x0, y0, x1, y1), best / 100.0))
    return result, noise / 100.0


def _along_line(ink: np.ndarray, box: Box) -> Box:
    """``box`` grown left and right over the ink of its rows, across gaps up to 1.5 line heights,
    by at most its own width plus 6 line heights each way (over a picture, every column has ink)."""
    x0, y0, x1, y1 = box
    columns: np.ndarray = np.asarray(ink[max(0, y0) : max(0, y1)].any(axis=0))
    height = max(1, y1 - y0)
    gap, most = int(1.5 * height), (x1 - x0) + 6 * height

    def reach(steps: range, edge: int) -> int:
        blank = 0
        for x in steps[:most]:
            blank = 0 if columns[x] else blank + 1
            if blank > gap:
                break
            if columns[x]:
                edge = x
        return edge

    right = reach(range(max(0, x1), columns.size), x1 - 1) + 1
    left = reach(range(min(x0, columns.size) - 1, -1, -1), x0)
    return left, y0, right, y1


def _stacked(ink: np.ndarray, box: Box) -> list[Box]:
    """The lines of ink stacked above and below ``box`` in its columns, as annotations sit in blocks
    (tesseract often reads the first and last line of a corner block and not the codes between):
    going up and down from the box, each run of ink rows between blank rows, no taller than 1.5
    line heights and no further than a line height from the last, is a line; at most
    :data:`STACK` each way. Over a picture no row is blank, and nothing is added."""
    x0, y0, x1, y1 = box
    height = max(1, y1 - y0)
    rows: np.ndarray = np.asarray(ink[:, max(0, x0) : max(0, x1)].any(axis=1))
    lines: list[Box] = []
    for step in (-1, 1):
        y = y0 - 1 if step < 0 else y1
        for _ in range(STACK):
            gap = 0
            while 0 <= y < rows.size and not rows[y] and gap <= height:
                y, gap = y + step, gap + 1
            if not (1 <= gap <= height) or not 0 <= y < rows.size:
                break  # no blank row before it (a picture), or nothing within a line height
            start = y
            while 0 <= y < rows.size and rows[y] and abs(y - start) <= 1.5 * height:
                y += step
            if not 0 <= y < rows.size or rows[y]:
                break  # taller than a line, or running off the image: not a line of text
            top, bottom = (y + 1, start + 1) if step < 0 else (start, y)
            lines.append((x0, top, x1, bottom))
    return lines


def _scaled(values: np.ndarray, max_side: int, zoom: float = 1.0) -> tuple[np.ndarray, float]:
    """The frame scaled down so that its longer side is at most ``max_side`` (a small one, up to
    :data:`SMALL_SIDE`, scaled up twice: its text is small too, and tesseract does not read text
    under ~10 pixels), as 8 bits with its 0.5-99.5 percentiles stretched (a few hot pixels do not
    flatten the rest); and the scale. ``zoom`` multiplies the scale (up to twice ``max_side``)."""
    from PIL import Image

    values = np.asarray(values, dtype=np.float32)
    rows, columns = values.shape
    longer = max(rows, columns, 1)
    scale = 2.0 if longer <= SMALL_SIDE and 2 * longer <= max_side else min(1.0, max_side / longer)
    scale = min(scale * zoom, 2 * max_side / longer) if zoom != 1.0 else scale
    if scale != 1.0:
        size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
        values = np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR))
    low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    span = high - low if high > low else 1.0
    return np.clip((values - low) * (255.0 / span), 0, 255).astype(np.uint8), scale


def _views(image: np.ndarray, levels: int = 3) -> list[tuple[np.ndarray, float]]:
    """What tesseract reads, each dark text on white (its training data), with its size relative to
    ``image``: the white and the black top-hat (strokes brighter, or darker, than what is around
    them, whatever the background: text over a picture, light on dark, dark on light), both again at
    half and at quarter size (for larger text), each without its strokes larger than a
    glyph (:func:`_glyphs_only`); and the brightest pixels alone (annotations are drawn at the
    display's full value, so this keeps them and drops the picture)."""
    from PIL import Image

    views: list[tuple[np.ndarray, float]] = []
    sizes = [(image, 1.0)]
    while len(sizes) < levels and min(sizes[-1][0].shape) >= 8 * STROKE:  # half and quarter size
        sizes.append((np.asarray(Image.fromarray(sizes[-1][0]).reduce(2)), sizes[-1][1] / 2))
    for source, factor in sizes:
        opened = _square(_square(source, np.min), np.max)
        closed = _square(_square(source, np.max), np.min)
        for response in (source.astype(np.int16) - opened, closed.astype(np.int16) - source):
            peak = int(response.max())
            if peak >= 40:  # something stands out
                views.append(
                    (_glyphs_only((255 - np.clip(response * (255.0 / peak), 0, 255)).astype(np.uint8)), factor)
                )
    brightest = image >= 255 * (1 - INK_BAND)
    if levels > 1 and 0 < brightest.mean() <= 0.2:  # more is a light background, not ink
        views.append((np.where(brightest, 0, 255).astype(np.uint8), 1.0))
    return views


def _glyphs_only(view: np.ndarray) -> np.ndarray:
    """``view`` with every connected stroke larger than a glyph (:data:`GLYPH`) whitened: lines,
    curves and frames of a drawing or a plot make tesseract's layout analysis miss the text beside
    them (measured: benchmarks/bench_ocr.py)."""
    parts = _parts(view < 128)
    if parts is None:
        return view
    (row, start, end, index), (top, bottom, left, right) = parts
    large = ((bottom - top) > GLYPH[0]) | ((right - left) > GLYPH[1])
    if not large.any():
        return view
    cleaned = view.copy()
    for i in np.flatnonzero(large[index]):
        cleaned[row[i], start[i] : end[i]] = 255
    return cleaned


_Runs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _parts(ink: np.ndarray) -> tuple[_Runs, _Runs] | None:
    """The runs of ``ink`` (row, start, end, index of their part) and the boxes of its connected
    parts (top, bottom, left, right; end-exclusive); None without ink."""
    row, start, end, part = _runs(ink)
    if row.size == 0:
        return None
    parts, index = np.unique(part, return_inverse=True)
    top = np.full(parts.size, ink.shape[0])
    bottom = np.zeros(parts.size, np.int64)
    left = np.full(parts.size, ink.shape[1])
    right = np.zeros(parts.size, np.int64)
    np.minimum.at(top, index, row)
    np.maximum.at(bottom, index, row + 1)
    np.minimum.at(left, index, start)
    np.maximum.at(right, index, end)
    return (row, start, end, index), (top, bottom, left, right)


def glyph_rows(view: np.ndarray) -> list[tuple[int, int]]:
    """The rows (first, after the last) where ``view`` shows :data:`SMALL_ROW` or more glyph-sized
    parts of one size side by side on a line: small text tesseract may not read at this size (it
    missed 8-9 pixel text on a 512² frame entirely, reading nothing, so no confidence warned:
    measured). Grain and speckle can line up too; that only costs a closer reading of those rows."""
    parts = _parts(view < 128)
    if parts is None:
        return []
    _, (top, bottom, left, right) = parts
    height, width = bottom - top, right - left
    small = np.flatnonzero((height >= SMALL_GLYPH[0]) & (height <= SMALL_GLYPH[1]) & (width <= 2 * height + 2))
    if small.size < SMALL_ROW:
        return []
    order = small[np.argsort(left[small], kind="stable")]
    chain: dict[int, tuple[int, int, int]] = {}  # part -> (length of the chain it ends, its top, bottom)
    lines: dict[int, list[int]] = {}  # parts by the band of their middle, in order of their left edge
    found: list[tuple[int, int]] = []
    for i in order:
        h, middle = int(height[i]), int(top[i] + bottom[i]) // 2
        length, first, last = 1, int(top[i]), int(bottom[i])
        for band in range((middle - h // 2) // 4, (middle + h // 2) // 4 + 1):
            for j in lines.get(band, ())[-8:]:
                gap = int(left[i]) - int(right[j])
                near = -1 <= gap <= 1.5 * h and abs((top[j] + bottom[j]) // 2 - middle) <= 0.35 * h
                if near and 0.6 * h <= height[j] <= 1.6 * h and chain[j][0] + 1 > length:
                    length, first, last = chain[j][0] + 1, min(chain[j][1], first), max(chain[j][2], last)
        chain[int(i)] = (length, first, last)
        if length >= SMALL_ROW:
            found.append((first, last))
        lines.setdefault(middle // 4, []).append(int(i))
    return found


def _runs(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of ``ink`` (row, first column, column after the last) and the connected
    part (8-neighbours) each belongs to, by union-find over the runs of neighbouring rows."""
    rows = ink.shape[0]
    edges = np.diff(np.pad(ink.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)
    end = np.nonzero(edges == -1)[1]
    parent = np.arange(row.size)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    first = np.searchsorted(row, np.arange(rows + 1))
    for r in range(1, rows):
        above, here = slice(first[r - 1], first[r]), slice(first[r], first[r + 1])
        if first[r - 1] == first[r] or first[r] == first[r + 1]:
            continue
        # a run touches a run above when they overlap, diagonally included
        low = np.searchsorted(end[above], start[here], side="left")
        high = np.searchsorted(start[above], end[here], side="right")
        for k in range(first[r + 1] - first[r]):
            for j in range(int(low[k]), int(high[k])):
                a, b = root(int(first[r - 1]) + j), root(int(first[r]) + k)
                if a != b:
                    parent[b] = a
    return row, start, end, np.array([root(i) for i in range(row.size)], dtype=np.int64)


def _square(image: np.ndarray, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """Minimum or maximum over a STROKE x STROKE square: along the rows, then the columns."""
    from numpy.lib.stride_tricks import sliding_window_view

    padded = np.pad(image, STROKE // 2, mode="edge")
    across = reduce(sliding_window_view(padded, STROKE, axis=1), axis=-1)
    return np.asarray(reduce(sliding_window_view(across, STROKE, axis=0), axis=-1), dtype=image.dtype)


def _tesseract(sheet: np.ndarray, mode: int) -> list[tuple[Box, float, str]]:
    """tesseract's words on ``sheet`` in page segmentation ``mode``: (left, top, width, height),
    confidence 0-100, text."""
    from PIL import Image
    from pytesseract import pytesseract as engine

    os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # pytesseract hands os.environ to tesseract
    with tempfile.TemporaryDirectory(prefix="sendit-ocr-") as folder:  # 0700: pixels and words may be PHI
        source, base = os.path.join(folder, "views.png"), os.path.join(folder, "words")
        Image.fromarray(sheet).save(source, compress_level=1)
        try:
            config = f"--psm {mode} {_CONFIG}"
            engine.run_tesseract(source, base, extension="tsv", lang="eng", config=config, timeout=TIMEOUT_SECONDS)
        except engine.TesseractNotFoundError:
            raise OcrUnavailable("OCR unavailable: tesseract not installed") from None
        except RuntimeError as exc:  # the time-out, and TesseractError
            raise OcrUnavailable(
                "OCR unavailable: tesseract " + ("timed out" if "timeout" in str(exc).lower() else "failed")
            ) from None
        with open(base + ".tsv", encoding="utf-8", errors="replace") as handle:
            table = engine.file_to_dict(handle.read(), "\t", -1)
    words: list[tuple[Box, float, str]] = []
    for i, level in enumerate(table.get("level", [])):
        text = str(table["text"][i]).strip()
        if int(level) == 5 and text:
            box = (int(table["left"][i]), int(table["top"][i]), int(table["width"][i]), int(table["height"][i]))
            words.append((box, float(table["conf"][i]), text))
    return words


def frame_values(ds: Dataset, index: int | None) -> np.ndarray:
    """One frame as a 2-D array, brighter meaning brighter on screen: colour as its luminance, or on a
    dark image as its brightest channel (coloured text on black is bright in one channel only);
    MONOCHROME1 inverted. Raises :class:`UnreadableFrame` when it cannot be decoded."""
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        array = pixel_array(ds, index=index, as_rgb=True)
    except Exception as exc:
        raise UnreadableFrame(f"pixel data could not be decoded for OCR ({type(exc).__name__})") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        with contextlib.suppress(Exception):  # if not, the indexes still show text as shapes
            array = np.asarray(apply_color_lut(array, ds))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = array[..., :3].astype(np.float32)
        luminance = rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        dark = float(np.median(luminance)) < 0.5 * float(rgb.max())
        return rgb.max(axis=2) if dark else luminance
    if array.ndim != 2:
        raise UnreadableFrame(f"pixel data of shape {array.shape} cannot be read by OCR")
    if photometric == "MONOCHROME1":
        return float(array.max()) - array.astype(np.float32)
    return array
