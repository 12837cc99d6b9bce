"""/admin shows paths masked like the logs: a folder named after the patient never appears."""

from __future__ import annotations

import pytest

from sendit.relay.models import Image, ReceivedFile, Series, Status, Study

pytestmark = pytest.mark.django_db


def test_admin_lists_and_forms_mask_patient_folder_names(admin_client: object) -> None:
    study = Study.objects.create(study_uid="1.2.3")
    series = Series.objects.create(study=study, series_uid="1.2.3.4")
    image = Image.objects.create(series=series, sop_instance_uid="1.2.3.4.5", path="DOE^JOHN/CT/IM1.dcm")
    rejected = ReceivedFile.objects.create(
        path="Doe, Jane/IM2.dcm", status=Status.QUARANTINED, reason="not a DICOM file"
    )
    pages = [
        "/admin/relay/image/",
        f"/admin/relay/image/{image.pk}/change/",
        "/admin/relay/receivedfile/",
        f"/admin/relay/receivedfile/{rejected.pk}/change/",
    ]
    for url in pages:
        response = admin_client.get(url)  # type: ignore[attr-defined]
        assert response.status_code == 200, url
        body = response.content.decode()
        assert "DOE^JOHN" not in body and "Doe, Jane" not in body, url
    assert "***/CT/IM1.dcm" in admin_client.get("/admin/relay/image/").content.decode()  # type: ignore[attr-defined]
