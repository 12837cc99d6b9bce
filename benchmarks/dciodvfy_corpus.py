"""Run dciodvfy on the input and the output of de-identification for a varied corpus; report new errors.

The corpus: every readable file of pydicom's bundled test set plus generated CT and MR from
``sendit.demo``. Each file is de-identified with the default options and no burned-in filter (so
secondary captures and ultrasound are checked too), then dciodvfy's ``Error`` lines of input and
output are compared per file after normalising them (values, offsets and element paths removed).

    .venv/bin/python benchmarks/dciodvfy_corpus.py           # prints a Markdown table
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pydicom

from sendit.deid import Deidentifier, DeidError
from sendit.identifiers import Identifiers

IDS = Identifiers("SIDPSEUDO1", "SIDPSEUDO1", "ACCPSEUDO1", jitter_days=-45)
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
_VALUE = re.compile(r"( = <[^>]*>|\"[^\"]*\"|'[^']*'|\b0x[0-9a-fA-F]+\b|\b\d+(?:\.\d+)*\b)")


def errors(path: Path) -> set[str]:
    """dciodvfy's Error lines for ``path``, normalised so that values and positions do not count."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return {_VALUE.sub("#", line.strip()) for line in lines if line.strip().startswith("Error")}


def corpus(work: Path) -> list[Path]:
    from sendit.demo import generate_demo

    files = sorted(p for p in CORPUS.rglob("*.dcm") if p.is_file())
    files += sorted(generate_demo(work / "demo", patients=1))[:6]
    return files


def compare(files: list[Path], out_dir: Path, engine: Deidentifier) -> list[tuple[str, str, int, int, list[str]]]:
    """(name, outcome, errors in, errors out, new errors) per file."""
    rows = []
    for index, src in enumerate(files):
        name = src.name if CORPUS in src.parents else f"demo/{src.parent.parent.name}/{src.name}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = engine.deidentify_file(src, out_dir / f"{index}.dcm", IDS)
        except DeidError as exc:
            rows.append((name, f"refused: {exc.reason[:60]}", 0, 0, []))
            continue
        before, after = errors(src), errors(result.path)
        rows.append((name, "written", len(before), len(after), sorted(after - before)))
    return rows


def main() -> int:
    if shutil.which("dciodvfy") is None:
        print("dciodvfy is not installed (Debian: dicom3tools)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sendit-dciodvfy-"))
    try:
        rows = compare(corpus(work), work / "out", Deidentifier("dciodvfy-corpus-key", pixel_filter=None))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| file | outcome | errors in | errors out | new errors |")
    print("|---|---|---|---|---|")
    for name, outcome, before, after, new in rows:
        print(f"| {name} | {outcome} | {before} | {after} | {'; '.join(new) or '—'} |")
    new_total = sum(len(row[4]) for row in rows)
    written = sum(1 for row in rows if row[1] == "written")
    print(f"\n{len(rows)} files, {written} written, {new_total} new error(s)")
    return 1 if new_total else 0


if __name__ == "__main__":
    sys.exit(main())
