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


def test_the_production_install_takes_no_development_tools() -> None:
    """install.sh installs the package alone; dev extras (Playwright, mypy, ruff) only in setup.sh."""
    install = (SCRIPTS / "install.sh").read_text()
    assert "pip install -q ." in install and "[dev]" not in install and "apt-get" not in install
    assert "[dev]" in (SCRIPTS / "setup.sh").read_text()
