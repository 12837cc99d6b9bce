"""The set-up scripts never touch what they did not start (an operator's Orthanc may be the PACS)."""

from __future__ import annotations

import re
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
STOPPING = re.compile(r"\b(pkill|killall)\b|systemctl\s+(stop|restart|disable|mask)|service\s+\S+\s+(stop|restart)")


def test_no_script_stops_or_restarts_a_service() -> None:
    for script in sorted(SCRIPTS.glob("*.sh")):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not STOPPING.search(code), f"{script.name}:{number}: {line.strip()}"


def code(script: str) -> list[str]:
    """The script's lines without comments, continuation lines joined."""
    text = (SCRIPTS / script).read_text().replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def test_the_production_install_takes_no_development_tools() -> None:
    """install.sh installs the package; dev extras (Playwright, mypy, ruff) only in setup.sh."""
    install = (SCRIPTS / "install.sh").read_text()
    assert "pip install -q ." in install and "[dev]" not in install
    assert "[dev]" in (SCRIPTS / "setup.sh").read_text()


def test_the_production_install_takes_only_tesseract_from_debian_and_only_when_missing_as_root() -> None:
    """OCR of burned-in text needs tesseract at run time; nothing else comes from apt, and apt-get
    does nothing but refresh its lists and install that one package."""
    lines = code("install.sh")
    apt = [line for line in lines if "apt-get" in line.split() and not line.startswith(("echo", "if"))]
    assert apt, "install.sh no longer installs tesseract-ocr"
    for line in apt:
        words = line.split()
        action = words[words.index("apt-get") + 1 :]
        if action[0] == "update":
            continue
        assert action[0] == "install", line
        packages = [w for w in action[1:] if not w.startswith(("-", ">", "/"))]
        assert packages == ["tesseract-ocr"], line
    text = "\n".join(lines)
    assert "command -v tesseract" in text and 'id -u)" = 0' in text  # only when missing, only as root


def test_the_developer_setup_installs_tesseract_for_the_ocr_tests() -> None:
    assert "need_apt+=(tesseract-ocr)" in "\n".join(code("setup.sh"))
