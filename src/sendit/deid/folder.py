"""De-identify a folder with no database: the engine behind ``sendit deid IN OUT``.

The folder is walked by the relay's rules (:mod:`sendit.dicomio.walk`: in-progress and hidden names
are left alone and counted, links never followed) and each file's header is read as the relay reads
it (:func:`sendit.dicomio.read_header`). Files are grouped by StudyInstanceUID / SeriesInstanceUID
from their headers (never by folder), the identifier provider is asked once per study, and every
image is written in the folder destination's layout
(:func:`sendit.destinations.folder.series_path`): de-identified values only, so no PHI appears in
any output path. A file that cannot be read or de-identified is listed with its reason and the rest
carry on. Each series that was written gets a ``series.json`` beside its images
(:mod:`sendit.deid.metadata`).

Two files with one SOPInstanceUID are decided as ingest decides them, in its words: the one whose
path comes first in the walk (sorted name by name) is the image; a later one is a ``duplicate of``
it (the same bytes) or a ``conflict`` (other bytes), listed and not written — wherever it lies in
the folder, whatever series it claims.

With ``workers > 1`` both passes — reading the headers and de-identifying — run in one process
pool, so two processes scale on both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sendit.deid.engine import Deidentifier, DeidError, DeidResult
from sendit.deid.metadata import write_series_document
from sendit.destinations.folder import image_path, series_path
from sendit.dicomio import FileHeader, Kind, RejectedFile, read_header, walk
from sendit.identifiers.base import IdentifierError, IdentifierProvider, Identifiers, SeriesHeader

_T = TypeVar("_T")
_CHUNK = 32


@dataclass
class FolderSummary:
    """What a folder run did; ``problems`` holds (path relative to the input, PHI-free reason);
    ``ignored`` counts the entries left alone by rule (``in_progress``, ``hidden``)."""

    files_seen: int = 0
    written: int = 0
    studies: int = 0
    series: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    results: list[DeidResult] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)

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
class _SeriesFiles:
    """One input series: its header (for the identifier provider) and its files."""

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

        jobs: dict[Path, _Job] = {}
        outputs: dict[Path, _OutputSeries] = {}
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
                remap = deidentifier.remap_uid
                base = series_path(out_dir, ids.patient_id, remap(series.header.study_uid), remap(series_uid))
                outputs[base] = _OutputSeries(ids.patient_id)
                for path, rel, sop_uid in series.files:
                    dst = image_path(base, remap(sop_uid))
                    if dst in jobs:  # two UIDs made one safe file name (Retain UIDs, hostile UIDs)
                        summary.problems.append((rel, f"conflict: same output file name as {jobs[dst].rel}"))
                        continue
                    jobs[dst] = _Job(path, dst, rel, ids)

        batch = list(jobs.values())
        for done, (job, outcome) in enumerate(zip(batch, _deidentify_jobs(batch, deidentifier, pool), strict=True)):
            if isinstance(outcome, DeidResult):
                summary.written += 1
                summary.results.append(outcome)
                outputs[job.dst.parent].add(job.src, outcome)
            else:
                summary.problems.append((job.rel, outcome))
            if progress is not None:
                progress(done + 1, len(batch))
    finally:
        if pool is not None:
            pool.shutdown()
    for base, output in outputs.items():
        if output.first is not None:
            _write_metadata(deidentifier, base, output, summary)
    summary.problems.sort()
    return summary


def _group(
    in_dir: Path, out_dir: Path, summary: FolderSummary, pool: Executor | None
) -> dict[str, dict[str, _SeriesFiles]]:
    """Read every header once (in the pool, if any); study UID → series UID → its files."""
    studies: dict[str, dict[str, _SeriesFiles]] = {}
    first_of: dict[str, tuple[Path, str]] = {}  # SOPInstanceUID → (path, relative path) of its image
    paths = _files(in_dir, out_dir.resolve(), summary)
    if pool is None:
        outcomes: Iterable[FileHeader | RejectedFile] = (read_header(path) for path, _ in paths)
    else:
        chunks = _chunks([path for path, _ in paths], pool)
        outcomes = (outcome for chunk in pool.map(_header_chunk, chunks) for outcome in chunk)
    for (path, rel), outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, RejectedFile):
            summary.problems.append((rel, outcome.reason))
            continue
        first = first_of.setdefault(outcome.sop_instance_uid, (path, rel))
        if first[0] != path:  # a later copy in the walk's order
            summary.problems.append((rel, _second_copy(first, path)))
            continue
        series_header = outcome.series
        study = studies.setdefault(series_header.study_uid, {})
        series = study.get(series_header.series_uid)
        if series is None:
            series = study[series_header.series_uid] = _SeriesFiles(series_header)
        series.files.append((path, rel, outcome.sop_instance_uid))
    return studies


def _second_copy(first: tuple[Path, str], path: Path) -> str:
    """Ingest's words for a second file with the image's SOPInstanceUID (relay.ingest)."""
    try:
        same = first[0].stat().st_size == path.stat().st_size and _sha256(first[0]) == _sha256(path)
    except OSError:
        same = False
    if same:
        return f"duplicate of an instance in the input ({first[1]})"
    return f"conflict: same SOPInstanceUID with different content ({first[1]} is the one processed)"


def _sha256(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def _files(root: Path, skip: Path, summary: FolderSummary) -> list[tuple[Path, str]]:
    """(path, path relative to ``root``) of every file to read, in walk order; the output folder
    ``skip`` is not entered; links, special files and unreadable folders are problems."""
    found: list[tuple[Path, str]] = []
    for entry in walk(root, ignored=summary.ignored, enter=lambda path, _: path.resolve() != skip):
        if entry.kind is Kind.FOLDER:
            continue  # the output folder
        if entry.kind is not Kind.UNREADABLE_FOLDER:
            summary.files_seen += 1
        if entry.kind is Kind.FILE:
            found.append((entry.path, entry.rel))
        else:
            summary.problems.append((entry.rel, entry.problem))
    return found


def _header_chunk(chunk: list[Path]) -> list[FileHeader | RejectedFile]:
    return [read_header(path) for path in chunk]


@dataclass
class _OutputSeries:
    """One output series folder: its pseudonym, how many images were written, the first source."""

    pseudonym: str
    images: int = 0
    first: Path | None = None
    result: DeidResult | None = None

    def add(self, src: Path, result: DeidResult) -> None:
        self.images += 1
        if self.first is None:
            self.first, self.result = src, result


def _write_metadata(deidentifier: Deidentifier, base: Path, output: _OutputSeries, summary: FolderSummary) -> None:
    assert output.first is not None and output.result is not None
    try:
        write_series_document(
            output.first,
            deidentifier.known_identifiers,
            base / "series.json",
            pseudonym=output.pseudonym,
            study_uid=output.result.study_uid,
            series_uid=output.result.series_uid,
            images=output.images,
        )
    except Exception as exc:  # the images are written; say the metadata is missing, and why
        summary.problems.append((base.name + "/series.json", f"metadata not written ({type(exc).__name__})"))


def _fail_study(summary: FolderSummary, study: dict[str, _SeriesFiles], reason: str) -> None:
    for series in study.values():
        summary.problems.extend((rel, reason) for _, rel, _ in series.files)


def _deidentify_jobs(jobs: list[_Job], deidentifier: Deidentifier, pool: Executor | None) -> Iterator[DeidResult | str]:
    """Outcomes in the order of ``jobs``: the result, or the reason it failed."""
    if pool is None or len(jobs) <= _CHUNK:
        for job in jobs:
            yield _deidentify_job(deidentifier, job)
        return
    for outcomes in pool.map(_worker_chunk, _chunks(jobs, pool)):
        yield from outcomes


def _chunks(items: list[_T], pool: Executor) -> list[list[_T]]:
    """Small enough that the workers finish together (about 8 chunks each), at most _CHUNK long."""
    workers = getattr(pool, "_max_workers", 2)
    size = max(1, min(_CHUNK, len(items) // (workers * 8) or 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _deidentify_job(deidentifier: Deidentifier, job: _Job) -> DeidResult | str:
    try:
        return deidentifier.deidentify_file(job.src, job.dst, job.ids)
    except DeidError as exc:
        return exc.reason


_worker_deidentifier: Deidentifier | None = None


def _init_worker(deidentifier: Deidentifier) -> None:
    """Also the log guard, as in every Sendit process: a pool started by spawn or forkserver (the
    default from Python 3.14) inherits none of the parent's."""
    from sendit.dicomio.quiet import install_log_guard

    global _worker_deidentifier
    _worker_deidentifier = deidentifier
    install_log_guard()


def _worker_chunk(chunk: list[_Job]) -> list[DeidResult | str]:
    assert _worker_deidentifier is not None, "worker not initialised"
    return [_deidentify_job(_worker_deidentifier, job) for job in chunk]
