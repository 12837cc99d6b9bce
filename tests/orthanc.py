"""A real Orthanc (Debian's /usr/sbin/Orthanc) for tests, on free loopback ports.

Fixtures (register with ``pytest_plugins = ["tests.orthanc"]`` in tests/conftest.py):

* ``orthanc_server`` — one shared, session-wide Orthanc with the default settings below. Tests that
  share it must use fresh UIDs and count per series, never globally.
* ``orthanc_factory`` — ``orthanc_factory(**options)`` starts another Orthanc with its own storage,
  e.g. ``check_called_aet=True, aet="OTHER"``, ``dicomweb=True`` (the DICOMweb plugin at
  ``server.dicomweb_url``), ``accepted_transfer_syntaxes=[...]``,
  ``lua=lua_error_on_modality("XX")`` (a C-STORE of such an image answers 0xA700, a REST upload
  HTTP 500), ``users={"u": "p"}``. Every server it made is stopped at the end of the session.

``OrthancServer.stop()`` / ``start()`` simulate an outage and a restart on the same ports and storage;
``start()`` waits for the old process to exit first (Orthanc's SQLite index is locked until then).

Choices, from DESIGN.md's pitfalls: ``TCP_NODELAY=1`` in Orthanc's environment (else ~45 ms per
C-STORE), ``MaximumPduLength`` 131072. Orthanc 1.10 cannot bind its DICOM port to one address, so by
default (``loopback_only=True``) it accepts associations only from the AE titles in ``known_aets``
*and* only from 127.0.0.1 (``DicomCheckModalityHost``); anything else is rejected with "calling AE
title not recognised". ``RemoteAccessAllowed: false`` does the same for HTTP.

When Orthanc is not installed the fixtures skip, unless ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from sendit.destinations.base import OutgoingImage

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DEFAULT_KNOWN_AETS: tuple[str, ...] = ("SENDIT", "FINDSCU", "STORESCU", "ECHOSCU", "GETSCU")
#: Debian's orthanc-dicomweb (`dpkg -L orthanc-dicomweb`); load it with ``dicomweb=True``
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def lua_error_on_modality(modality: str = "XX") -> str:
    """A ReceivedInstanceFilter that throws for one Modality: Orthanc answers C-STORE 0xA700, REST 500."""
    return (
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f"  if dicom.Modality == '{modality}' then error('refused by the test filter') end\n"
        "  return true\n"
        "end\n"
    )


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class OrthancServer:
    """One Orthanc process with its own config, storage and ports (fixed for its lifetime)."""

    root: Path
    aet: str = "ORTHANC"
    check_called_aet: bool = False
    users: dict[str, str] | None = None
    loopback_only: bool = True
    known_aets: tuple[str, ...] = DEFAULT_KNOWN_AETS
    accepted_transfer_syntaxes: list[str] | None = None
    unknown_sop_class_accepted: bool = False
    lua: str | None = None
    dicomweb: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    http_port: int = 0
    dicom_port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.http_port and self.dicom_port):
            self.http_port, self.dicom_port = _free_ports(2)

    # -- addresses -------------------------------------------------------------------------

    host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        return next(iter(self.users.items())) if self.users else None

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        storage = str(self.root / "storage")
        cfg: dict[str, Any] = {
            "Name": f"sendit-test-{self.dicom_port}",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [],
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": dict(self.users or {}),
            "WebDavEnabled": False,
            "StorageCompression": False,
            "SaveJobs": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "MaximumPduLength": 131072,
            "UnknownSopClassAccepted": self.unknown_sop_class_accepted,
            "DicomScpTimeout": 30,
        }
        if self.loopback_only:
            cfg |= {
                "DicomAlwaysAllowEcho": False,
                "DicomAlwaysAllowStore": False,
                "DicomAlwaysAllowFind": False,
                "DicomCheckModalityHost": True,
                "DicomModalities": {aet.lower(): [aet, "127.0.0.1", 104] for aet in self.known_aets},
            }
        else:
            cfg |= {"DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True}
        if self.accepted_transfer_syntaxes is not None:
            cfg["AcceptedTransferSyntaxes"] = list(self.accepted_transfer_syntaxes)
        if self.dicomweb:
            cfg["Plugins"] = [DICOMWEB_PLUGIN]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.lua:
            script = self.root / "filter.lua"
            script.write_text(self.lua)
            cfg["LuaScripts"] = [str(script)]
        cfg |= self.extra_config
        return cfg

    def start(self, timeout: float = START_TIMEOUT) -> OrthancServer:
        """Start (or restart on the same ports and storage) and wait until GET /system answers."""
        if self.running:
            return self
        self._reap()
        cfg_path = self.root / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        env = dict(os.environ, TCP_NODELAY="1")
        with self.log_path.open("ab") as logf:
            self._proc = subprocess.Popen(
                [ORTHANC_BIN, str(cfg_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(auth=self.auth, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    if client.get(f"{self.url}/system").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not come up within {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT, *, kill: bool = False) -> None:
        """SIGTERM (SIGKILL with ``kill=True``, i.e. a crash), wait, SIGKILL if it lingers."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
            except ProcessLookupError:
                pass
        self._reap()

    def terminate(self) -> None:
        """Send SIGTERM without waiting (Orthanc takes 2-4 s to stop; stop several in parallel)."""
        if self.running and self._proc is not None:
            self._proc.terminate()

    def restart(self) -> OrthancServer:
        self.stop()
        return self.start()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=STOP_TIMEOUT)
            self._proc = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- independent views of what Orthanc holds (plain REST, not the code under test) -------

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=10.0)

    def instances_in_series(self, series_uid: str) -> dict[str, str]:
        """SOPInstanceUID → Orthanc instance ID, via /tools/find."""
        query = {"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}, "Expand": True}
        with self.client() as c:
            r = c.post("/tools/find", json=query)
            r.raise_for_status()
            return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in r.json()}

    def stored_file(self, instance_id: str) -> bytes:
        with self.client() as c:
            r = c.get(f"/instances/{instance_id}/file")
            r.raise_for_status()
            return r.content

    def count_instances(self) -> int:
        with self.client() as c:
            return int(c.get("/statistics").json()["CountInstances"])


# -- small, valid, de-identified-looking test images ------------------------------------------


def write_ct(
    path: Path,
    *,
    series_uid: str,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class_uid: str = CTImageStorage,
    modality: str = "CT",
    size: int = 64,
) -> Path:
    """A minimal valid CT image (64×64 uint16, Explicit VR Little Endian) with fresh UIDs."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=[series_uid, "study"])
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = "SENDIT-TEST-0001"
    ds.PatientName = "Test^Pseudonym"
    ds.Modality = modality
    ds.StudyDate = "20000101"
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng()
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def restamp(testdata_name: str, path: Path, *, series_uid: str, modality: str | None = None) -> Path:
    """One of pydicom's bundled test files (compressed ones stay compressed) with fresh UIDs."""
    source = get_testdata_file(testdata_name)
    assert isinstance(source, str), f"pydicom test file {testdata_name} not available"
    ds = dcmread(source)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[series_uid, "study"])
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if modality:
        ds.Modality = modality
    ds.save_as(path, enforce_file_format=True)
    return path


def outgoing(path: Path, image_id: int) -> OutgoingImage:
    """What the shell would hand a destination for this file."""
    ds = dcmread(path, stop_before_pixels=True)
    return OutgoingImage(
        image_id=image_id,
        path=path,
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def make_series(folder: Path, n: int, *, first_id: int = 1, **kwargs: Any) -> list[OutgoingImage]:
    """``n`` CT images of one fresh series, as OutgoingImages with consecutive image_ids."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    return [
        outgoing(write_ct(folder / f"{first_id + k}.dcm", series_uid=series_uid, **kwargs), first_id + k)
        for k in range(n)
    ]


FINDSCU = "/usr/bin/findscu"  # DCMTK's, not pynetdicom's app of the same name in .venv/bin


def findscu_sop_uids(server: OrthancServer, series_uid: str) -> set[str]:
    """What the peer holds for a series, asked with DCMTK's findscu, independently of our code."""
    if not shutil.which(FINDSCU):
        message = "DCMTK's findscu is not installed (apt-get install dcmtk)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    cmd = [FINDSCU, "-v", "-S", "-aet", "FINDSCU", "-aec", server.aet]
    cmd += ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"SeriesInstanceUID={series_uid}", "-k", "SOPInstanceUID"]
    out = subprocess.run([*cmd, server.host, str(server.dicom_port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"\(0008,0018\) UI \[([0-9.]+)\x00?\]", out.stdout + out.stderr))


def dataset_part(data: bytes) -> bytes:
    """The bytes after the file meta group: what a C-STORE carries (Orthanc writes its own meta)."""
    assert data[128:132] == b"DICM"
    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    return data[132 + 12 + meta.FileMetaInformationGroupLength :]


def _require_orthanc() -> None:
    if not os.access(ORTHANC_BIN, os.X_OK):
        message = f"Orthanc is not installed ({ORTHANC_BIN}); apt-get install orthanc"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def require_dicomweb_plugin() -> None:
    """Orthanc's DICOMweb plugin (Debian orthanc-dicomweb, installed by scripts/setup.sh)."""
    if not os.path.exists(DICOMWEB_PLUGIN):
        message = f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OrthancServer]]:
    """Start extra Orthancs with their own options; all are stopped when the session ends."""
    _require_orthanc()
    servers: list[OrthancServer] = []

    def make(**options: Any) -> OrthancServer:
        server = OrthancServer(root=tmp_path_factory.mktemp("orthanc"), **options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def orthanc_server(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """The shared default Orthanc: AET ORTHANC, no auth, loopback-only, all syntaxes accepted."""
    return orthanc_factory()
