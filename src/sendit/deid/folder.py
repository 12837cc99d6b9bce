"""De-identify a folder with no database: the engine behind ``sendit deid IN OUT``.

Files are grouped by StudyInstanceUID / SeriesInstanceUID from their headers (never by folder), the
identifier provider is asked once per study, and every image is written as
``<pseudonymized patient id>/<study uid>/<series uid>/<sop instance uid>.dcm`` — de-identified
values only, so no PHI appears in any output path. A file that cannot be read or de-identified is
listed with its reason and the rest carry on. Each series that was written gets a ``series.json``
beside its images (:mod:`sendit.deid.metadata`).

With ``workers > 1`` both passes — reading the headers and de-identifying — run in one process
pool, so two processes scale on both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sendit.deid.engine import Deidentifier, DeidError, DeidResult, read_dicom
from sendit.deid.metadata import describe_series, series_document, write_document
from sendit.destinations.folder import safe_path_part
from sendit.identifiers.base import IdentifierError, IdentifierProvider, Identifiers, SeriesHeader

_T = TypeVar("_T")
_CHUNK = 32


@dataclass
class FolderSummary:
    """What a folder run did; ``problems`` holds (path relative to the input, PHI-free reason)."""

    files_seen: int = 0
    written: int = 0
    studies: int = 0
    series: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    results: list[DeidResult] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.problems)


@dataclass(frozen=True)
class _Job:
    src: Path
    dst: Path
    rel: str
    ids: Identifiers


@dataclass
class _Series:
    header: SeriesHeader
    files: list[tuple[Path, str, str]] = field(default_factory=list)  # (path, relative, sop uid)


def deid_folder(
    in_dir: Path,
    out_dir: Path,
    deidentifier: Deidentifier,
    provider: IdentifierProvider,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> FolderSummary:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir``.

    ``workers > 1`` de-identifies in that many processes. ``progress(done, total)`` is called as
    images finish (for a progress bar).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    summary = FolderSummary()
    pool: Executor | None = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(deidentifier,))
    try:
        studies = _group(in_dir, out_dir, summary, pool)
        summary.studies = len(studies)
        summary.series = sum(len(series) for series in studies.values())

        # Several files may claim one output (the same SOPInstanceUID twice): try them in order until
        # one is written, so a truncated copy found first does not cost the good one.
        candidates: dict[Path, list[_Job]] = {}
        outputs: dict[Path, _Output] = {}
        for study in studies.values():
            headers = [s.header for s in study.values()]
            try:
                answers = provider.identify(headers)
            except IdentifierError as exc:
                _fail_study(summary, study, f"identifiers: {exc}")
                continue
            except Exception as exc:
                _fail_study(summary, study, f"identifiers: provider failed ({type(exc).__name__})")
                continue
            for series_uid, series in study.items():
                ids = answers.get(series_uid)
                if ids is None:
                    _fail_study(summary, {series_uid: series}, "identifiers: provider gave none for this series")
                    continue
                base = (
                    out_dir
                    / safe_path_part(ids.patient_id)
                    / deidentifier.remap_uid(series.header.study_uid)
                    / deidentifier.remap_uid(series_uid)
                )
                outputs[base] = _Output(ids.patient_id)
                for path, rel, sop_uid in series.files:
                    dst = base / f"{deidentifier.remap_uid(sop_uid)}.dcm"
                    candidates.setdefault(dst, []).append(_Job(path, dst, rel, ids))

        total = len(candidates)
        done = 0
        while candidates:
            batch = [jobs.pop(0) for jobs in candidates.values()]
            for job, outcome in zip(batch, _run(batch, deidentifier, pool), strict=True):
                if isinstance(outcome, DeidResult):
                    summary.written += 1
                    summary.results.append(outcome)
                    outputs[job.dst.parent].add(job.src, outcome)
                    rest = candidates.pop(job.dst)
                    summary.problems.extend((dup.rel, "duplicate SOPInstanceUID in the input; skipped") for dup in rest)
                else:
                    summary.problems.append((job.rel, outcome))
                    if not candidates[job.dst]:
                        del candidates[job.dst]
                if job.dst not in candidates:
                    done += 1
                    if progress is not None:
                        progress(done, total)
    finally:
        if pool is not None:
            pool.shutdown()
    for base, output in outputs.items():
        if output.first is not None:
            _write_metadata(deidentifier, base, output, summary)
    summary.problems.sort()
    return summary


def _group(in_dir: Path, out_dir: Path, summary: FolderSummary, pool: Executor | None) -> dict[str, dict[str, _Series]]:
    """Read every header once (in the pool, if any); study UID → series UID → its files."""
    studies: dict[str, dict[str, _Series]] = {}
    paths = list(_files(in_dir, out_dir.resolve()))
    summary.files_seen += len(paths)
    if pool is None:
        outcomes: Iterable[_HeaderOutcome] = (_read_header(path) for path in paths)
    else:
        chunks = _chunks(paths, pool)
        outcomes = (outcome for chunk in pool.map(_header_chunk, chunks) for outcome in chunk)
    for path, outcome in zip(paths, outcomes, strict=True):
        rel = path.relative_to(in_dir).as_posix()
        if isinstance(outcome, str):
            summary.problems.append((rel, outcome))
            continue
        values, header = outcome
        missing = [k for k, v in values.items() if not v]
        if missing:
            summary.problems.append((rel, f"missing {', '.join(missing)}"))
            continue
        study = studies.setdefault(values["StudyInstanceUID"], {})
        series = study.get(values["SeriesInstanceUID"])
        if series is None:
            series = study[values["SeriesInstanceUID"]] = _Series(header)
        series.files.append((path, rel, values["SOPInstanceUID"]))
    return studies


_HeaderOutcome = tuple[dict[str, str], SeriesHeader] | str


def _read_header(path: Path) -> _HeaderOutcome:
    """The UIDs and identifying values of one file, or the reason it cannot be used."""
    try:
        ds = read_dicom(path, headers_only=True)
    except DeidError as exc:
        return exc.reason
    with warnings.catch_warnings():  # pydicom's warnings quote the (PHI) values they complain about
        warnings.simplefilter("ignore")
        values = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            values[keyword] = str(ds.get(keyword, "") or "").strip(" \x00")
        return values, _header(ds, values)


def _header_chunk(chunk: list[Path]) -> list[_HeaderOutcome]:
    return [_read_header(path) for path in chunk]


@dataclass
class _Output:
    """One output series folder: its pseudonym, how many images were written, the first source."""

    pseudonym: str
    images: int = 0
    first: Path | None = None
    result: DeidResult | None = None

    def add(self, src: Path, result: DeidResult) -> None:
        self.images += 1
        if self.first is None:
            self.first, self.result = src, result


def _write_metadata(deidentifier: Deidentifier, base: Path, output: _Output, summary: FolderSummary) -> None:
    assert output.first is not None and output.result is not None
    try:
        header = read_dicom(output.first, headers_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            described = describe_series(header, deidentifier.known_identifiers(header))
        document = series_document(
            described,
            pseudonym=output.pseudonym,
            study_uid=output.result.study_uid,
            series_uid=output.result.series_uid,
            images=output.images,
        )
        write_document(document, base / "series.json")
    except Exception as exc:  # the images are written; say the metadata is missing, and why
        summary.problems.append((base.name + "/series.json", f"metadata not written ({type(exc).__name__})"))


def _files(root: Path, skip: Path) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order, leaving out the output folder."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() != skip)
        for name in sorted(filenames):
            path = here / name
            if path.is_file():
                yield path


def _header(ds: object, values: dict[str, str]) -> SeriesHeader:
    def text(keyword: str) -> str:
        return str(getattr(ds, keyword, "") or "").strip()

    return SeriesHeader(
        series_uid=values["SeriesInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        accession_number=text("AccessionNumber"),
        study_date=text("StudyDate"),
        study_time=text("StudyTime"),
        modality=text("Modality"),
    )


def _fail_study(summary: FolderSummary, study: dict[str, _Series], reason: str) -> None:
    for series in study.values():
        summary.problems.extend((rel, reason) for _, rel, _ in series.files)


def _run(jobs: list[_Job], deidentifier: Deidentifier, pool: Executor | None) -> Iterator[DeidResult | str]:
    """Outcomes in the order of ``jobs``: the result, or the reason it failed."""
    if pool is None or len(jobs) <= _CHUNK:
        for job in jobs:
            yield _one(deidentifier, job)
        return
    for outcomes in pool.map(_worker_chunk, _chunks(jobs, pool)):
        yield from outcomes


def _chunks(items: list[_T], pool: Executor) -> list[list[_T]]:
    """Small enough that the workers finish together (about 8 chunks each), at most _CHUNK long."""
    workers = getattr(pool, "_max_workers", 2)
    size = max(1, min(_CHUNK, len(items) // (workers * 8) or 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _one(deidentifier: Deidentifier, job: _Job) -> DeidResult | str:
    try:
        return deidentifier.deidentify_file(job.src, job.dst, job.ids)
    except DeidError as exc:
        return exc.reason


_worker_deidentifier: Deidentifier | None = None


def _init_worker(deidentifier: Deidentifier) -> None:
    global _worker_deidentifier
    _worker_deidentifier = deidentifier


def _worker_chunk(chunk: list[_Job]) -> list[DeidResult | str]:
    assert _worker_deidentifier is not None, "worker not initialised"
    return [_one(_worker_deidentifier, job) for job in chunk]
