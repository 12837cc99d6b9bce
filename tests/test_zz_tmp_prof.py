import cProfile
import pstats
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from sendit.relay import received
from tests.orthanc import write_ct

pytestmark = pytest.mark.django_db(transaction=True)


def test_prof(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    series = generate_uid()
    datas = [write_ct(tmp_path / f"{i}.dcm", series_uid=series, size=512).read_bytes() for i in range(200)]
    received.keep(datas[0])
    prof = cProfile.Profile()
    c0 = time.process_time()
    t0 = time.thread_time()
    prof.enable()
    for data in datas[1:]:
        received.keep(data)
    prof.disable()
    print(f"\nCPU process {(time.process_time() - c0) / 199 * 1000:.2f} ms, this thread {(time.thread_time() - t0) / 199 * 1000:.2f} ms")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)
