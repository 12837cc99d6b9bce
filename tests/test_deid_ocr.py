"""Burned-in text found, not assumed: images the filter flags are read by OCR (tesseract).

Generated images: text rendered with Pillow at several sizes and positions (its ink box known), and
pictures without text (gradients, smooth "photographs", line drawings, a tiny test image). A flagged
image without text is released as it is, with the reading and its confidence recorded; text is
blanked, so that the pixels under it are uniform and OCR reads nothing there any more, or the image
is quarantined when the operator chose OCR_ON_TEXT = quarantine; without tesseract nothing flagged is
released.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

from sendit.deid import BurnedInError, Deidentifier
from sendit.deid import ocr as ocr_module
from sendit.deid.ocr import OcrSettings, find_text
from sendit.identifiers import Identifiers

pytestmark = pytest.mark.skipif(
    ocr_module.unavailable_reason() != "", reason="needs Debian's tesseract-ocr (scripts/setup.sh installs it)"
)
IDS = Identifiers("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1", jitter_days=-45)
SC_POLICY = "Secondary capture: policy"
BLANK = OcrSettings(on_text="blank")
Box = tuple[int, int, int, int]


# -- generated images ---------------------------------------------------------------------------


def render(pixels: np.ndarray, text: str, xy: tuple[int, int], size: int, ink: int = 255) -> Box:
    """Draw ``text`` on ``pixels`` (2-D uint8, in place) with Pillow's own font; returns its ink box."""
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    draw.text(xy, text, fill=ink, font=font)
    pixels[...] = np.asarray(image)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    return int(x0), int(y0), int(x1), int(y1)


def gradient(rows: int, columns: int) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:columns]
    return (40 + 150 * (x + y) / (rows + columns)).astype(np.uint8)


def photograph(rows: int, columns: int, seed: int = 3) -> np.ndarray:
    """Smooth blobs and a little grain: what a clinical photograph's surfaces look like to OCR."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((columns, rows), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(smooth * 0.8 + 30 + rng.normal(0, 3, (rows, columns)), 0, 255).astype(np.uint8)


def drawing(rows: int, columns: int) -> np.ndarray:
    """A line drawing: circles, rectangles and lines on white."""
    image = Image.new("L", (columns, rows), 255)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, columns - 40, rows - 60), outline=0, width=2)
    draw.rectangle((columns // 3, rows // 3, columns // 2, rows // 2), outline=0, width=3)
    draw.line((0, rows - 1, columns - 1, 0), fill=0, width=2)
    draw.line((10, rows // 2, columns - 10, rows // 2 + 30), fill=0, width=1)
    return np.asarray(image).copy()


def secondary_capture(frames: np.ndarray, *, rgb: bool = False) -> Dataset:
    """A Secondary Capture (flagged by the shipped filter's policy rule) holding ``frames``:
    (rows, columns), (frames, rows, columns) or, with ``rgb``, a trailing axis of 3 samples."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN0012345"
    ds.Modality, ds.ConversionType, ds.Manufacturer = "OT", "WSD", "ACME"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.StudyDate = "20240115"
    multi = frames.ndim == (4 if rgb else 3)
    if multi:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:3] if multi else frames.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def deidentify(ds: Dataset, tmp_path: Path, engine: Deidentifier | None = None) -> tuple[Dataset, str]:
    """Through the file API, as the relay does; returns the written data set and the pixel note.
    The default engine blanks the text it finds (OCR_ON_TEXT = blank)."""
    result = (engine or Deidentifier("k", ocr=BLANK)).deidentify_file(
        save(ds, tmp_path / "in.dcm"), tmp_path / "out.dcm", IDS
    )
    return pydicom.dcmread(result.path), result.pixels


def grown(box: Box, by: int = 1) -> Box:
    """The ink box plus a pixel of anti-aliasing around it."""
    return box[0] - by, box[1] - by, box[2] + by, box[3] + by


# -- text found ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns", "text", "xy", "size", "background"),
    [
        (128, 160, "DOE^JANE", (4, 3), 14, "black"),  # top-left corner, small image
        (256, 256, "MRN 0012345", (140, 230), 14, "black"),  # bottom-right, touching the edge
        (320, 320, "St Mary Hospital", (60, 150), 22, "photograph"),  # over a picture
        (240, 320, "2024-01-15 10:32", (20, 200), 28, "gradient"),  # large, dark on a gradient
    ],
)
def test_text_is_found_and_blanked_at_several_sizes_and_positions(
    tmp_path: Path, rows: int, columns: int, text: str, xy: tuple[int, int], size: int, background: str
) -> None:
    pixels = {"black": np.zeros((rows, columns), np.uint8), "photograph": photograph(rows, columns)}.get(
        background, gradient(rows, columns)
    )
    ink = 20 if background == "gradient" else 255
    x0, y0, x1, y1 = grown(render(pixels, text, xy, size, ink))
    out, note = deidentify(secondary_capture(pixels), tmp_path)
    after = out.pixel_array
    assert (after[max(0, y0) : y1, max(0, x0) : x1] == 0).all()  # uniform black under the text
    assert not find_text(out, OcrSettings()).found  # and nothing left to read
    assert note.startswith(f"burned-in text check ({SC_POLICY}): text detected by OCR: ")
    assert note.endswith("; blanked")
    assert out.BurnedInAnnotation == "NO" and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert "113101" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    untouched = np.ones(after.shape, bool)
    for box in find_text(secondary_capture(pixels), OcrSettings()).regions:
        untouched[box[1] : box[3], box[0] : box[2]] = False
    assert np.array_equal(after[untouched], pixels[untouched])  # only the text's boxes changed


def test_coloured_text_on_a_compressed_colour_image_is_blanked(tmp_path: Path) -> None:
    plane = np.zeros((160, 240), np.uint8)
    box = grown(render(plane, "Garcia Maria", (30, 60), 18))
    frame = np.zeros((160, 240, 3), np.uint8)
    frame[plane > 0] = (255, 220, 0)  # yellow text, as ultrasound machines draw it
    ds = secondary_capture(frame, rgb=True)
    ds.compress(RLELossless)
    out, note = deidentify(ds, tmp_path)
    assert "text detected by OCR" in note
    assert (out.pixel_array[box[1] : box[3], box[0] : box[2]] == 0).all()


def test_quarantine_on_text_keeps_the_image_back(tmp_path: Path) -> None:
    pixels = np.zeros((128, 192), np.uint8)
    render(pixels, "SMITH JOHN", (10, 10), 16)
    with pytest.raises(BurnedInError) as info:  # quarantine on text is the default
        deidentify(secondary_capture(pixels), tmp_path, Deidentifier("k"))
    assert re.fullmatch(
        rf"text detected by OCR: {SC_POLICY}; \d+ region\(s\), OCR_ON_TEXT is quarantine", info.value.reason
    )
    assert not (tmp_path / "out.dcm").exists()


def test_a_cine_is_read_on_its_first_frame_or_every_nth(tmp_path: Path) -> None:
    frames = np.stack([gradient(128, 192) for _ in range(5)])
    box = grown(render(frames[0], "DOE^JANE", (8, 8), 16))  # text on frame 0 only
    out, note = deidentify(secondary_capture(frames), tmp_path)
    assert "on 1 frame," in note  # the default reads one frame per cine
    blanked = out.pixel_array[:, box[1] : box[3], box[0] : box[2]]
    assert (blanked == 0).all()  # the text's box is blanked in every frame

    late = np.stack([gradient(128, 192) for _ in range(5)])
    box = grown(render(late[3], "DOE^JANE", (8, 8), 16))  # text on frame 3 only
    engine = Deidentifier("k", ocr=OcrSettings(on_text="blank", every_nth_frame=3))
    out, note = deidentify(secondary_capture(late), tmp_path / "nth", engine)
    assert "on 2 frames," in note  # frames 0 and 3
    assert (out.pixel_array[3, box[1] : box[3], box[0] : box[2]] == 0).all()


def test_burned_in_yes_with_text_is_blanked_and_recorded_as_clean(tmp_path: Path) -> None:
    pixels = np.zeros((128, 192), np.uint8)
    render(pixels, "ID 12345678", (12, 100), 14)
    ds = secondary_capture(pixels)
    ds.BurnedInAnnotation = "YES"
    out, note = deidentify(ds, tmp_path, Deidentifier("k", pixel_filter=None, ocr=BLANK))
    assert note.startswith("burned-in text check (BurnedInAnnotation is YES): text detected by OCR")
    assert out.BurnedInAnnotation == "NO"


def test_small_text_tesseract_misses_at_its_size_is_read_closer(tmp_path: Path) -> None:
    """9-pixel text on a 512² frame: at the frame's own size tesseract reads nothing at all (so no
    confidence warns); a row of glyph-sized shapes makes the reading doubtful and a closer one finds it."""
    pixels = gradient(512, 512)
    box = grown(render(pixels, "DOE, JANE 1960", (3, 370), 9))
    first = find_text(secondary_capture(pixels), OcrSettings())
    assert not first.found and first.confidence == 0.0
    with pytest.raises(BurnedInError) as info:
        deidentify(secondary_capture(pixels), tmp_path, Deidentifier("k"))
    assert info.value.reason.startswith(f"text detected by OCR: {SC_POLICY}")
    out, note = deidentify(secondary_capture(pixels), tmp_path / "blank")
    assert note.endswith("; blanked")
    assert (out.pixel_array[box[1] : box[3], box[0] : box[2]] == 0).all()


def test_a_long_word_is_text_whatever_tesseracts_confidence() -> None:
    assert ocr_module.is_text("SMITH*JOHN", 0.0)  # read right over speckle, at confidence 0
    assert not ocr_module.is_text("ae", 60.0) and not ocr_module.is_text("saree", 0.0)  # noise


# -- no text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pixels",
    [gradient(256, 256), photograph(256, 320), drawing(240, 320), np.full((8, 8), 128, np.uint8)],
    ids=["gradient", "photograph", "drawing", "tiny"],
)
def test_a_flagged_image_without_text_is_released_with_its_confidence(tmp_path: Path, pixels: np.ndarray) -> None:
    out, note = deidentify(secondary_capture(pixels), tmp_path)
    assert np.array_equal(out.pixel_array, pixels)  # untouched
    match = re.fullmatch(
        rf"burned-in text check \({SC_POLICY}\): no text found by OCR on 1 frame, confidence (\d\.\d\d)", note
    )
    assert match and 0.0 <= float(match.group(1)) <= 1.0
    assert "BurnedInAnnotation" not in out  # nothing was blanked, so nothing is claimed
    assert "113101" not in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]


def test_burned_in_yes_without_readable_text_stays_quarantined(tmp_path: Path) -> None:
    ds = secondary_capture(gradient(128, 128))
    ds.BurnedInAnnotation = "YES"  # the device says there is text: OCR not finding it means OCR missed it
    with pytest.raises(BurnedInError) as info:
        deidentify(ds, tmp_path)
    assert info.value.reason == (
        f"burned-in annotation: {SC_POLICY} (BurnedInAnnotation is YES); OCR found no text to blank"
    )


def test_a_reading_that_stays_unsure_is_quarantined(tmp_path: Path) -> None:
    """A drawing's lines read as stray letters: below OCR_RELEASE_CONFIDENCE, after the closer look
    too, the image is kept back, and the reason says OCR was unsure rather than that it saw text."""
    engine = Deidentifier("k", ocr=OcrSettings(release_confidence=1.0))
    with pytest.raises(BurnedInError) as info:
        deidentify(secondary_capture(drawing(240, 320)), tmp_path, engine)
    assert re.fullmatch(
        rf"may hold burned-in text: {SC_POLICY}; OCR found no text but is unsure "
        r"\(confidence 0\.\d\d < OCR_RELEASE_CONFIDENCE\)",
        info.value.reason,
    ), info.value.reason


# -- OCR off or missing: fail closed ------------------------------------------------------------


def test_without_tesseract_a_flagged_image_stays_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract on the path
    ocr_module.unavailable_reason.cache_clear()
    try:
        with pytest.raises(BurnedInError) as info:
            deidentify(secondary_capture(gradient(64, 64)), tmp_path)
    finally:
        monkeypatch.undo()
        ocr_module.unavailable_reason.cache_clear()
    assert info.value.reason == f"may hold burned-in text: {SC_POLICY}; OCR unavailable: tesseract not installed"
    assert not (tmp_path / "out.dcm").exists()


def test_with_ocr_off_a_flagged_image_is_quarantined_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(BurnedInError) as info:
        deidentify(secondary_capture(gradient(64, 64)), tmp_path, Deidentifier("k", ocr=OcrSettings(enabled=False)))
    assert info.value.reason == f"may hold burned-in text: {SC_POLICY}; OCR is off"


def test_an_image_nobody_flags_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("OCR ran on an image no rule flagged")

    monkeypatch.setattr("sendit.deid.pixels.find_text", refuse)
    ds = secondary_capture(gradient(64, 64))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "ACME", ["ORIGINAL", "PRIMARY", "AXIAL"]
    del ds.ConversionType
    _, note = deidentify(ds, tmp_path)
    assert note == ""


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"on_text": "erase"}, "OCR_ON_TEXT must be one of blank, quarantine"),
        ({"every_nth_frame": -1}, "OCR_EVERY_NTH_FRAME"),
        ({"max_side": 10}, "OCR_MAX_SIDE"),
    ],
)
def test_settings_refuse_what_they_cannot_do(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OcrSettings(**changes)  # type: ignore[arg-type]


def test_frames_read_per_setting() -> None:
    assert list(OcrSettings().frames(40)) == [0]
    assert list(OcrSettings(every_nth_frame=10).frames(40)) == [0, 10, 20, 30]
    assert list(OcrSettings(every_nth_frame=10).frames(1)) == [0]


def test_the_configuration_refuses_an_unknown_choice_on_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sendit.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    env = {"SENDIT_SECRET_KEY": "s" * 40, "SENDIT_OCR_ON_TEXT": "erase"}
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    assert "OCR_ON_TEXT: must be one of blank, quarantine, got 'erase'" in info.value.problems
    env["SENDIT_OCR_ON_TEXT"] = "quarantine"
    assert load_config(None, env=env).OCR_ON_TEXT == "quarantine"
