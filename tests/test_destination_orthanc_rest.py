"""OrthancRestDestination against a real Orthanc; arrival is checked with plain httpx calls to Orthanc."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid

from sendit.destinations import DestinationError, OutgoingImage
from sendit.destinations.orthanc_rest import OrthancRestDestination
from tests.orthanc import OrthancServer, lua_error_on_modality, make_series, outgoing, restamp

pytestmark = pytest.mark.orthanc


def dest_for(server: OrthancServer, **kwargs: Any) -> OrthancRestDestination:
    options: dict[str, Any] = {"timeout": 15.0, "connect_timeout": 2.0}
    if server.auth:
        options["username"], options["password"] = server.auth
    return OrthancRestDestination(server.url, **(options | kwargs))


def held(server: OrthancServer, images: list[OutgoingImage]) -> dict[str, str]:
    return server.instances_in_series(images[0].series_uid)


def test_batch_is_delivered_byte_for_byte(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 5)
    series = images[0].series_uid
    images.append(outgoing(restamp("JPEG2000.dcm", tmp_path / "j2k.dcm", series_uid=series), 99))
    dest = dest_for(orthanc_server)
    try:
        results = dest.send(images)
    finally:
        dest.close()

    assert [(r.image_id, r.delivered, r.permanent) for r in results] == [(i.image_id, True, False) for i in images]
    ids = held(orthanc_server, images)
    assert set(ids) == {i.sop_instance_uid for i in images}
    for image in images:
        assert orthanc_server.stored_file(ids[image.sop_instance_uid]) == image.path.read_bytes()


def test_resend_is_already_stored_not_duplicated(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 3)
    dest = dest_for(orthanc_server)
    assert all(r.delivered for r in dest.send(images))
    again = dest.send(images)
    dest.close()
    assert all(r.delivered and not r.warning for r in again)
    assert len(held(orthanc_server, images)) == 3


def test_file_orthanc_cannot_parse_is_permanent(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    good = make_series(tmp_path, 1)[0]
    junk_path = tmp_path / "junk.dcm"
    junk_path.write_bytes(b"this is not DICOM at all" * 10)
    junk = dataclasses.replace(good, image_id=2, path=junk_path, sop_instance_uid="1.2.3")
    dest = dest_for(orthanc_server)

    good_result, junk_result = dest.send([good, junk])
    dest.close()

    assert good_result.delivered
    assert (junk_result.delivered, junk_result.permanent, junk_result.status) == (False, True, 400)
    assert "could not store" in junk_result.message
    assert str(junk_path) not in junk_result.message


def test_server_error_is_retryable(orthanc_factory: Callable[..., OrthancServer], tmp_path: Path) -> None:
    server = orthanc_factory(lua=lua_error_on_modality("XX"))
    refused = make_series(tmp_path / "xx", 1, modality="XX")[0]
    fine = make_series(tmp_path / "ct", 1, first_id=2)[0]
    dest = dest_for(server)

    refused_result, fine_result = dest.send([refused, fine])
    dest.close()

    assert fine_result.delivered
    assert (refused_result.delivered, refused_result.permanent) == (False, False)
    assert refused_result.status is not None and refused_result.status >= 500
    assert server.instances_in_series(refused.series_uid) == {}


def test_credentials(orthanc_factory: Callable[..., OrthancServer], tmp_path: Path) -> None:
    server = orthanc_factory(users={"sendit": "s3cret-pw"})
    images = make_series(tmp_path, 2)

    anonymous = dest_for(server, username=None, password=None)
    assert "credentials" in (anonymous.check() or "")
    with pytest.raises(DestinationError, match="credentials") as info:
        anonymous.send(images)
    assert info.value.retryable
    assert "s3cret" not in str(info.value)
    anonymous.close()

    in_url = OrthancRestDestination(server.url.replace("http://", "http://sendit:s3cret-pw@"))
    assert in_url.check() is None and "s3cret" not in in_url.name
    in_url.close()

    dest = dest_for(server)
    assert dest.check() is None
    assert all(r.delivered for r in dest.send(images))
    assert dest.missing(images[0].series_uid, {i.sop_instance_uid for i in images}) == set()
    dest.close()


def test_unreachable_raises_retryable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = OrthancRestDestination(f"http://sendit:s3cret-pw@127.0.0.1:{port}", connect_timeout=2.0)
    with pytest.raises(DestinationError) as info:
        dest.send(make_series(tmp_path, 2))
    assert info.value.retryable
    problem = dest.check() or ""
    assert f"cannot reach Orthanc at http://127.0.0.1:{port}" in problem
    assert "Connection refused" in problem and "ORTHANC_URL" in problem
    assert "s3cret" not in problem
    with pytest.raises(DestinationError):
        dest.missing("1.2.3", {"1.2.3.4"})
    dest.close()


def test_outage_mid_batch_then_resend_without_duplicates(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = orthanc_factory()
    images = make_series(tmp_path, 6)
    dest = dest_for(server, concurrency=1)  # one connection: the crash lands at a known image
    calls = 0
    original = httpx.Client.post

    def crash_before_fourth(self: httpx.Client, *args: Any, **kwargs: Any) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 4:
            server.stop(kill=True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(httpx.Client, "post", crash_before_fourth)
    results = dest.send(images)
    monkeypatch.undo()

    assert [r.delivered for r in results] == [True] * 3 + [False] * 3
    assert not any(r.permanent for r in results) and all(r.message for r in results[3:])
    with pytest.raises(DestinationError):  # still down, nothing got through
        dest.send(images[3:])

    server.start()  # same ports and storage; the destination's pooled connections are now stale
    uids = {i.sop_instance_uid for i in images}
    assert dest.missing(images[0].series_uid, uids) == {i.sop_instance_uid for i in images[3:]}
    assert all(r.delivered for r in dest.send(images))
    dest.close()
    assert set(held(server, images)) == uids
    assert server.count_instances() == 6


def test_missing_and_no_phi_in_urls(orthanc_server: OrthancServer, tmp_path: Path) -> None:
    images = make_series(tmp_path, 3)
    dest = dest_for(orthanc_server)
    urls: list[str] = []
    dest._client.event_hooks["request"].append(lambda request: urls.append(str(request.url)))

    dest.send(images[:2])
    uids = {i.sop_instance_uid for i in images}
    assert dest.missing(images[0].series_uid, uids) == {images[2].sop_instance_uid}
    assert dest.missing(generate_uid(), uids) == uids
    assert dest.check() is None
    dest.close()

    assert urls
    for url in urls:  # only Orthanc's own IDs in paths, never a DICOM identifier
        assert images[0].series_uid not in url and images[0].patient_id not in url
        assert not any(uid in url for uid in uids)


# -- sendit check: what will fail, with the URL and what to change ----------------------------

READ_ONLY_FILTER = (
    "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n  return method == 'GET'\nend\n"
)


def test_check_catches_a_filter_that_refuses_verification(
    orthanc_factory: Callable[..., OrthancServer], tmp_path: Path
) -> None:
    server = orthanc_factory(lua=READ_ONLY_FILTER)  # GET /system answers; every POST is refused
    dest = dest_for(server)

    problem = dest.check() or ""

    assert f"Orthanc at {server.url} refused POST /tools/lookup, which verification needs" in problem
    assert "HTTP 403" in problem and "IncomingHttpRequestFilter" in problem
    dest.close()


def test_check_catches_a_url_that_is_not_orthancs_root(orthanc_server: OrthancServer) -> None:
    dest = OrthancRestDestination(f"{orthanc_server.url}/app", timeout=15.0, connect_timeout=2.0)

    problem = dest.check() or ""

    assert f"Orthanc at {orthanc_server.url}/app" in problem and "REST root" in problem
    assert dest_for(orthanc_server).check() is None
    dest.close()
