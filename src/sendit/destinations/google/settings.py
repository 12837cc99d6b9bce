"""The Google keys of the configuration, as one object the adapters share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GoogleSettings:
    bucket: str
    prefix: str = ""
    credentials_file: str = ""  # empty: the environment's default credentials
    project: str = ""  # empty: the credentials' (or the emulator's) project
    kind: str = "SenditSeries"
    nifti: bool = False
    timeout: float = 60.0  # one request with its retries

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> GoogleSettings:
        return cls(
            bucket=values["GOOGLE_CLOUD_STORAGE"],
            prefix=str(values["GOOGLE_STORAGE_PREFIX"]).strip("/"),
            credentials_file=values["GOOGLE_APPLICATION_CREDENTIALS"],
            project=values["GOOGLE_PROJECT"],
            kind=values["GOOGLE_DATASTORE_KIND"],
            nifti=values["GOOGLE_NIFTI"],
            timeout=float(values["GOOGLE_TIMEOUT"]),
        )

    def __repr__(self) -> str:  # the credentials path is a secret key's value
        return f"GoogleSettings(bucket={self.bucket!r}, prefix={self.prefix!r}, nifti={self.nifti})"
