"""The DASHER provider against a real HTTP server on loopback (tests/dasher_server.py).

What an operator relies on: every series gets the service's pseudonyms and shift, a failing or wrong
service stops the series with a reason that carries no PHI, transient trouble is retried a bounded
number of times, and the token never shows up in messages or logs.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sendit.config import KEYS, KEYS_BY_NAME, Timeout, load_config
from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader
from sendit.identifiers.dasher import DasherProvider, DasherSettings
from sendit.identifiers.loader import ProviderLoadError, load_provider
from tests.dasher_server import DasherServer, jitter_for, suid_for

DEFAULTS: dict[str, Any] = {key.name: key.default for key in KEYS}  # the configuration's, declared once
DEFAULT_ID_SOURCE = KEYS_BY_NAME["DASHER_ID_SOURCE"].default
DEFAULT_ITEM_ID_SOURCE = KEYS_BY_NAME["DASHER_ITEM_ID_SOURCE"].default

PATIENT = "MRN-0042-PHI"
OTHER_PATIENT = "MRN-0777-PHI"
ACCESSION = "ACC-123-PHI"
OTHER_ACCESSION = "ACC-456-PHI"
NAME = "DOE^JANE"
BIRTH = "19610727"
STUDY_DATE = "20240102"


def header(
    series_uid: str,
    *,
    patient_id: str = PATIENT,
    accession: str = ACCESSION,
    study_uid: str = "1.2.3.1",
    birth: str = BIRTH,
    study_date: str = STUDY_DATE,
    study_time: str = "101530.25",
) -> SeriesHeader:
    return SeriesHeader(
        series_uid=series_uid,
        study_uid=study_uid,
        patient_id=patient_id,
        patient_name=NAME,
        patient_birth_date=birth,
        accession_number=accession,
        study_date=study_date,
        study_time=study_time,
        modality="CT",
    )


class Sleeps(list[float]):
    """Records the back-off instead of sleeping, so retry tests take milliseconds."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def settings_with(**fields: Any) -> DasherSettings:
    """The configuration's defaults with a service and a token, then ``fields`` on top."""
    base = {**DEFAULTS, "DASHER_URL": "https://dasher.example.org", "DASHER_STUDY": "s", "DASHER_TOKEN": "t"}
    return replace(DasherSettings.from_config(base), **fields)


def make(server: DasherServer, sleeps: Callable[[float], None] | None = None, **overrides: Any) -> DasherProvider:
    fields: dict[str, Any] = {
        "base_url": server.url,
        "study": server.study,
        "token": server.initial_token,
        "connect_timeout": 0.5,
        "read_timeout": 0.3,
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_cap": 0.04,
    }
    fields.update(overrides)
    return DasherProvider(settings_with(**fields), sleep=sleeps if sleeps is not None else Sleeps())


def phi_free(text: str, server: DasherServer | None = None, *extra: str) -> bool:
    """No original value, pseudonym, date or secret appears in ``text``."""
    forbidden = [PATIENT, OTHER_PATIENT, ACCESSION, OTHER_ACCESSION, NAME, BIRTH, STUDY_DATE, "1961", *extra]
    forbidden += [suid_for(DEFAULT_ID_SOURCE, p) for p in (PATIENT, OTHER_PATIENT)]
    forbidden += [suid_for(DEFAULT_ITEM_ID_SOURCE, a, "A") for a in (ACCESSION, OTHER_ACCESSION)]
    if server is not None:
        forbidden += [server.initial_token, server.client_secret, server.refresh_token, "issued-token"]
    return not [value for value in forbidden if value in text]


# -- success -----------------------------------------------------------------------------------------


def test_maps_suids_jitter_and_name_with_one_request_for_the_study(dasher_server: DasherServer) -> None:
    series = [header("1.9.1"), header("1.9.2"), header("1.9.3", accession=OTHER_ACCESSION)]
    result = make(dasher_server).identify(series)

    assert len(dasher_server.requests) == 1
    request = dasher_server.requests[0]
    assert request.path == f"/uid/{dasher_server.study}"
    assert request.bearer == dasher_server.initial_token
    assert request.body == {
        "identifiers": [
            {
                "id": PATIENT,
                "id_source": DEFAULT_ID_SOURCE,
                "id_timestamp": "1961-07-27",
                "items": [
                    {"id": ACCESSION, "id_source": DEFAULT_ITEM_ID_SOURCE, "id_timestamp": "2024-01-02T10:15:30"},
                    {"id": OTHER_ACCESSION, "id_source": DEFAULT_ITEM_ID_SOURCE, "id_timestamp": "2024-01-02T10:15:30"},
                ],
            }
        ]
    }
    suid = suid_for(DEFAULT_ID_SOURCE, PATIENT)
    first = result["1.9.1"]
    assert first.patient_id == suid
    assert first.patient_name == suid
    assert first.accession_number == suid_for(DEFAULT_ITEM_ID_SOURCE, ACCESSION, "A")
    assert first.jitter_days == jitter_for(DEFAULT_ID_SOURCE, PATIENT) != 0
    assert first.provider == "dasher"
    assert result["1.9.2"].accession_number == first.accession_number  # same accession, same item
    assert result["1.9.3"].accession_number == suid_for(DEFAULT_ITEM_ID_SOURCE, OTHER_ACCESSION, "A")
    # raw is the service's answer for this series: the patient result with only its own item.
    raw = result["1.9.3"].raw["result"]
    assert raw["suid"] == suid and [i["id"] for i in raw["items"]] == [OTHER_ACCESSION]
    assert Identifiers.from_json(first.to_json()) == first


def test_custom_fields_and_patient_name_format(dasher_server: DasherServer) -> None:
    provider = make(
        dasher_server,
        custom_field_map={"site": "ClinicalTrialSiteID", "arm": "ClinicalTrialProtocolID"},
        patient_name_format="{arm}^{suid}",
    )
    ids = provider.identify([header("1.9.1")])["1.9.1"]
    suid = suid_for(DEFAULT_ID_SOURCE, PATIENT)
    assert ids.custom_fields == {"ClinicalTrialSiteID": f"SITE-{suid}", "ClinicalTrialProtocolID": "B"}
    assert ids.patient_name == f"B^{suid}"


def test_mapped_custom_field_missing_from_answer_is_an_error(dasher_server: DasherServer) -> None:
    provider = make(dasher_server, custom_field_map={"cohort": "ClinicalTrialSiteID"})
    with pytest.raises(IdentifierError, match="cohort") as err:
        provider.identify([header("1.9.1")])
    assert not err.value.retryable


def test_one_request_per_study(dasher_server: DasherServer) -> None:
    series = [
        header("1.9.1", study_uid="1.2.3.1"),
        header("1.9.2", study_uid="1.2.3.2", patient_id=OTHER_PATIENT, accession=OTHER_ACCESSION),
        header("1.9.3", study_uid="1.2.3.1"),
    ]
    result = make(dasher_server).identify(series)
    assert len(dasher_server.requests) == 2
    assert [[i["id"] for i in r.body["identifiers"]] for r in dasher_server.requests] == [[PATIENT], [OTHER_PATIENT]]
    assert result["1.9.2"].patient_id == suid_for(DEFAULT_ID_SOURCE, OTHER_PATIENT)
    assert result["1.9.1"].patient_id == result["1.9.3"].patient_id != result["1.9.2"].patient_id


def test_item_cap_splits_a_study_into_several_requests(dasher_server: DasherServer) -> None:
    series = [header(f"1.9.{n}", accession=f"ACC-{n}") for n in range(5)]
    result = make(dasher_server, max_items_per_request=2).identify(series)
    item_counts = [sum(len(p["items"]) for p in r.body["identifiers"]) for r in dasher_server.requests]
    assert item_counts == [2, 2, 1]
    assert len(result) == 5
    assert {ids.patient_id for ids in result.values()} == {suid_for(DEFAULT_ID_SOURCE, PATIENT)}
    assert result["1.9.4"].accession_number == suid_for(DEFAULT_ITEM_ID_SOURCE, "ACC-4", "A")


def test_series_without_accession_or_dates_still_gets_a_patient(dasher_server: DasherServer) -> None:
    ids = make(dasher_server).identify([header("1.9.1", accession="", birth="", study_date="")])["1.9.1"]
    assert dasher_server.requests[0].body == {
        "identifiers": [{"id": PATIENT, "id_source": DEFAULT_ID_SOURCE, "items": []}]
    }
    assert ids.patient_id == suid_for(DEFAULT_ID_SOURCE, PATIENT)
    assert ids.accession_number == ""


def test_no_series_no_request(dasher_server: DasherServer) -> None:
    assert make(dasher_server).identify([]) == {}
    assert dasher_server.requests == []


def test_series_without_patient_id_is_refused_before_asking(dasher_server: DasherServer) -> None:
    with pytest.raises(IdentifierError, match="series 2 of 2 has no PatientID") as err:
        make(dasher_server).identify([header("1.9.1"), header("1.9.2", patient_id=" ")])
    assert not err.value.retryable
    assert dasher_server.requests == []


# -- transient failures: bounded retries --------------------------------------------------------------


def test_5xx_is_retried_with_backoff_then_succeeds(dasher_server: DasherServer) -> None:
    dasher_server.fail("500", times=2)
    sleeps = Sleeps()
    result = make(dasher_server, sleeps, max_attempts=3).identify([header("1.9.1")])
    assert result["1.9.1"].patient_id == suid_for(DEFAULT_ID_SOURCE, PATIENT)
    assert len(dasher_server.requests) == 3
    assert sleeps == [0.01, 0.02]  # exponential


def test_5xx_every_time_gives_up_after_max_attempts_as_retryable(dasher_server: DasherServer) -> None:
    dasher_server.fail_always("500")
    sleeps = Sleeps()
    with pytest.raises(IdentifierError) as err:
        make(dasher_server, sleeps, max_attempts=4, backoff_cap=0.025).identify([header("1.9.1")])
    assert err.value.retryable
    assert "HTTP 500" in str(err.value) and "4 attempt" in str(err.value)
    assert len(dasher_server.requests) == 4
    assert sleeps == [0.01, 0.02, 0.025]  # capped
    assert phi_free(str(err.value), dasher_server)


def test_retry_after_is_honoured_within_the_cap(dasher_server: DasherServer) -> None:
    dasher_server.fail("503")
    sleeps = Sleeps()
    make(dasher_server, sleeps, backoff_cap=5.0).identify([header("1.9.1")])
    assert sleeps == [1.0]


def test_stalled_answer_times_out_and_is_retried(dasher_server: DasherServer) -> None:
    dasher_server.fail("stall")
    result = make(dasher_server, read_timeout=0.3).identify([header("1.9.1")])
    assert "1.9.1" in result
    assert len(dasher_server.requests) == 2


def test_service_that_always_stalls_fails_in_bounded_time(dasher_server: DasherServer) -> None:
    dasher_server.fail_always("stall")
    started = time.monotonic()
    with pytest.raises(IdentifierError, match="timed out") as err:
        make(dasher_server, read_timeout=0.3, max_attempts=2).identify([header("1.9.1")])
    assert time.monotonic() - started < 1.5
    assert err.value.retryable
    assert len(dasher_server.requests) == 2


def test_unreachable_service_is_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_with(
        base_url=f"http://127.0.0.1:{port}",
        study="s",
        token="t",
        connect_timeout=0.3,
        read_timeout=0.3,
        max_attempts=2,
        backoff_base=0.0,
    )
    with pytest.raises(IdentifierError, match="connection failed") as err:
        DasherProvider(settings, sleep=Sleeps()).identify([header("1.9.1")])
    assert err.value.retryable


# -- refusals and wrong answers: not retryable, no PHI ------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("malformed", "malformed JSON"),
        ("not_object", "not an object with a 'results' list"),
        ("drop_item", "lacks 1 of 2 requested item"),
        ("extra_item", "item that was not asked about"),
        ("empty_suid", "empty or missing suid"),
        ("empty_item_suid", "item 1 of 2 has an empty or missing suid"),
        ("echo_id", "original identifier"),
        ("zero_jitter", "jitter of 0 days"),
        ("float_jitter", "not an integer"),
        ("string_jitter", "not an integer"),
        ("bool_jitter", "not an integer"),
        ("big_jitter", "outside ±3650 days"),
        ("item_jitter_mismatch", "different from its patient's"),
        ("wrong_patient", "patient that was not asked about"),
        ("drop_patient", "lacks 1 of 2 requested patient"),
        ("bad_custom_fields", "custom_fields"),
    ],
)
def test_unusable_answer_is_a_permanent_error_without_phi(
    dasher_server: DasherServer, mode: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dasher_server.fail(mode)
    series = [
        header("1.9.1"),
        header("1.9.2", accession=OTHER_ACCESSION),
        header("1.9.3", patient_id=OTHER_PATIENT, accession="ACC-999"),
    ]
    with pytest.raises(IdentifierError) as err:
        make(dasher_server).identify(series)
    message = str(err.value)
    assert reason in message
    assert not err.value.retryable
    assert len(dasher_server.requests) == 1  # a wrong answer is not retried
    assert phi_free(message, dasher_server, "ACC-999")
    assert phi_free(caplog.text, dasher_server, "ACC-999")


@pytest.mark.parametrize(("mode", "status"), [("400", "HTTP 400 Bad Request")])
def test_client_error_is_permanent_and_does_not_echo_the_body(
    dasher_server: DasherServer, mode: str, status: str
) -> None:
    dasher_server.fail(mode)
    with pytest.raises(IdentifierError) as err:
        make(dasher_server).identify([header("1.9.1")])
    assert status in str(err.value)
    assert not err.value.retryable
    assert len(dasher_server.requests) == 1
    assert phi_free(str(err.value), dasher_server)


def test_unknown_study_is_a_permanent_404(dasher_server: DasherServer) -> None:
    with pytest.raises(IdentifierError, match="HTTP 404 Not Found") as err:
        make(dasher_server, study="no-such-study").identify([header("1.9.1")])
    assert not err.value.retryable


# -- tokens --------------------------------------------------------------------------------------


def test_401_refreshes_with_client_credentials_once_and_reuses_the_new_token(dasher_server: DasherServer) -> None:
    dasher_server.revoke_tokens()
    provider = make(
        dasher_server,
        token_url=dasher_server.token_url,
        client_id=dasher_server.client_id,
        client_secret=dasher_server.client_secret,
    )
    provider.identify([header("1.9.1")])
    assert [r.bearer for r in dasher_server.requests] == [dasher_server.initial_token, "issued-token-1"]
    assert len(dasher_server.token_requests) == 1
    assert dasher_server.token_requests[0].body == {"grant_type": "client_credentials"}

    provider.identify([header("1.9.2")])  # the refreshed token is kept, not fetched again
    assert dasher_server.requests[-1].bearer == "issued-token-1"
    assert len(dasher_server.token_requests) == 1


def test_401_refreshes_with_refresh_token_grant(dasher_server: DasherServer) -> None:
    dasher_server.fail("401")
    provider = make(dasher_server, token_url=dasher_server.token_url, refresh_token=dasher_server.refresh_token)
    provider.identify([header("1.9.1")])
    assert dasher_server.token_requests[0].body == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-token-1",
    }
    assert dasher_server.requests[-1].bearer == "issued-token-1"


def test_token_endpoint_alone_supplies_the_first_token(dasher_server: DasherServer) -> None:
    provider = make(
        dasher_server,
        token="",
        token_url=dasher_server.token_url,
        client_id=dasher_server.client_id,
        client_secret=dasher_server.client_secret,
    )
    provider.identify([header("1.9.1")])
    assert [r.bearer for r in dasher_server.requests] == ["issued-token-1"]


def test_second_401_is_authentication_failed_not_retryable(
    dasher_server: DasherServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dasher_server.fail_always("401")
    provider = make(
        dasher_server,
        token_url=dasher_server.token_url,
        client_id=dasher_server.client_id,
        client_secret=dasher_server.client_secret,
    )
    with pytest.raises(IdentifierError, match="authentication failed") as err:
        provider.identify([header("1.9.1")])
    assert not err.value.retryable
    assert len(dasher_server.requests) == 2
    assert len(dasher_server.token_requests) == 1
    assert phi_free(str(err.value), dasher_server) and phi_free(caplog.text, dasher_server)


def test_401_without_a_way_to_refresh_is_authentication_failed(dasher_server: DasherServer) -> None:
    dasher_server.revoke_tokens()
    with pytest.raises(IdentifierError, match="authentication failed") as err:
        make(dasher_server).identify([header("1.9.1")])
    assert not err.value.retryable
    assert len(dasher_server.requests) == 1
    assert dasher_server.initial_token not in str(err.value)


def test_token_endpoint_refusing_credentials_is_authentication_failed(dasher_server: DasherServer) -> None:
    dasher_server.revoke_tokens()
    provider = make(
        dasher_server,
        token_url=dasher_server.token_url,
        client_id=dasher_server.client_id,
        client_secret="wrong-secret",
    )
    with pytest.raises(IdentifierError, match="authentication failed") as err:
        provider.identify([header("1.9.1")])
    assert not err.value.retryable
    assert "wrong-secret" not in str(err.value)


def test_token_endpoint_down_is_retryable(dasher_server: DasherServer) -> None:
    dasher_server.revoke_tokens()
    dasher_server.fail_token("500", times=5)
    provider = make(
        dasher_server, token_url=dasher_server.token_url, refresh_token=dasher_server.refresh_token, max_attempts=2
    )
    with pytest.raises(IdentifierError, match="token endpoint unavailable") as err:
        provider.identify([header("1.9.1")])
    assert err.value.retryable
    assert len(dasher_server.token_requests) == 2


def test_token_is_read_fresh_from_the_token_file(dasher_server: DasherServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(dasher_server.initial_token + "\n")
    provider = make(dasher_server, token="", token_file=str(token_file))
    provider.identify([header("1.9.1")])
    assert dasher_server.requests[-1].bearer == dasher_server.initial_token

    dasher_server.accepted_tokens.add("rotated-token")
    token_file.write_text("rotated-token")
    provider.identify([header("1.9.2")])
    assert dasher_server.requests[-1].bearer == "rotated-token"


def test_401_rereads_a_rotated_token_file(dasher_server: DasherServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old-token")
    # the file is rotated while the first request is in flight; the service refuses the old token
    dasher_server.on_uid_request = lambda request: token_file.write_text(dasher_server.initial_token)
    make(dasher_server, token="", token_file=str(token_file)).identify([header("1.9.1")])
    assert [r.bearer for r in dasher_server.requests] == ["old-token", dasher_server.initial_token]


def test_missing_token_file_is_a_clear_error(dasher_server: DasherServer, tmp_path: Path) -> None:
    provider = make(dasher_server, token="", token_file=str(tmp_path / "absent"))
    with pytest.raises(IdentifierError, match="cannot read DASHER_TOKEN_FILE"):
        provider.identify([header("1.9.1")])
    assert dasher_server.requests == []


def test_logs_carry_no_phi_or_secrets_through_retries_and_refresh(
    dasher_server: DasherServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dasher_server.revoke_tokens()
    dasher_server.fail("500")
    provider = make(
        dasher_server,
        token_url=dasher_server.token_url,
        client_id=dasher_server.client_id,
        client_secret=dasher_server.client_secret,
    )
    provider.identify([header("1.9.1"), header("1.9.2", patient_id=OTHER_PATIENT, accession=OTHER_ACCESSION)])
    assert caplog.records  # it does say what it is doing
    assert phi_free(caplog.text, dasher_server)
    assert "retrying" in caplog.text


# -- settings and loading ----------------------------------------------------------------------------


def test_settings_from_the_loaded_configuration(tmp_path: Path) -> None:
    """Environment text is parsed once, by the configuration; the provider takes the typed values."""
    env = {
        "SENDIT_SECRET_KEY": "k" * 40,
        "SENDIT_DATA_DIR": str(tmp_path / "data"),
        "SENDIT_DEIDENTIFY_RESTFUL": "true",
        "SENDIT_DASHER_URL": "https://dasher.example.org/api/",
        "SENDIT_DASHER_STUDY": "study-1",
        "SENDIT_DASHER_TOKEN_FILE": str(tmp_path / "t"),
        "SENDIT_DASHER_TIMEOUT": "2,20",
        "SENDIT_DASHER_MAX_ATTEMPTS": "5",
        "SENDIT_DASHER_MAX_ITEMS": "50",
        "SENDIT_DASHER_JITTER_BOUND": "60",
        "SENDIT_PATIENT_NAME_FORMAT": "{suid}^ANON",
        "SENDIT_CUSTOM_FIELD_MAP": '{"site": "ClinicalTrialSiteID"}',
    }
    settings = DasherSettings.from_config(load_config(None, env=env).values)
    assert settings.base_url == "https://dasher.example.org/api"
    assert (settings.connect_timeout, settings.read_timeout) == (2.0, 20.0)
    assert (settings.max_attempts, settings.max_items_per_request, settings.jitter_bound) == (5, 50, 60)
    assert settings.custom_field_map == {"site": "ClinicalTrialSiteID"}
    assert settings.id_source == DEFAULT_ID_SOURCE and settings.patient_name_format == "{suid}^ANON"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"DASHER_MAX_ATTEMPTS": "5"}, "DASHER_MAX_ATTEMPTS must be a whole number"),  # text: not parsed here
        ({"DASHER_TIMEOUT": 5}, "DASHER_TIMEOUT must be a pair"),
        ({"CUSTOM_FIELD_MAP": '{"site": "ClinicalTrialSiteID"}'}, "CUSTOM_FIELD_MAP must be a mapping"),
        ({"DASHER_ID_SOURCE": None}, "DASHER_ID_SOURCE is missing"),
    ],
)
def test_settings_take_typed_values_and_name_a_wrong_one(changes: dict[str, Any], message: str) -> None:
    mapping = {**DEFAULTS, "DASHER_URL": "https://d.example", "DASHER_STUDY": "s", "DASHER_TOKEN": "t", **changes}
    with pytest.raises(ValueError, match=message):
        DasherSettings.from_config({k: v for k, v in mapping.items() if v is not None})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "dasher.example.org"}, "DASHER_URL"),
        ({"base_url": "https://user:pw@dasher.example.org"}, "DASHER_URL must not carry"),
        ({"token": "", "token_file": ""}, "DASHER_TOKEN"),
        ({"token_url": "https://t/token"}, "DASHER_CLIENT_ID"),
        ({"max_attempts": 0}, "DASHER_MAX_ATTEMPTS"),
        ({"max_items_per_request": 0}, "DASHER_MAX_ITEMS"),
        ({"patient_name_format": "{suid.__class__}"}, "PATIENT_NAME_FORMAT"),
        ({"patient_name_format": "{suid"}, "PATIENT_NAME_FORMAT"),
        ({"custom_field_map": {"site": "NotAKeyword"}}, "CUSTOM_FIELD_MAP"),
    ],
)
def test_bad_settings_are_refused_naming_the_knob(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        settings_with(**{"token": "secret-token", **overrides})
    assert "secret-token" not in str(err.value)


def test_secrets_stay_out_of_repr() -> None:
    settings = settings_with(
        base_url="https://d",
        token="tok-secret",
        token_url="https://d/token",
        client_id="id",
        client_secret="cs-secret",
    )
    assert "tok-secret" not in repr(settings) and "cs-secret" not in repr(settings)
    assert "tok-secret" not in repr(DasherProvider(settings))
    assert replace(settings, token="other").token == "other"


def test_load_provider_builds_dasher_from_the_configuration(dasher_server: DasherServer) -> None:
    provider = load_provider(
        "sendit.identifiers.dasher.DasherProvider",
        {
            **DEFAULTS,
            "DASHER_URL": dasher_server.url,
            "DASHER_STUDY": dasher_server.study,
            "DASHER_TOKEN": dasher_server.initial_token,
            "DASHER_TIMEOUT": Timeout(1.0, 1.0),
        },
    )
    assert provider.identify([header("1.9.1")])["1.9.1"].patient_id == suid_for(DEFAULT_ID_SOURCE, PATIENT)


class NoIdentify:
    def __init__(self, settings: Any) -> None:
        self.settings = settings


class NoSettingsKeyword:
    def __init__(self) -> None:
        pass

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        return {}


class Custom:
    def __init__(self, settings: Any) -> None:
        self.prefix = settings["CUSTOM_PREFIX"]

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        return {h.series_uid: Identifiers(self.prefix, self.prefix, "", -5) for h in series}


def test_load_provider_with_a_custom_class() -> None:
    provider = load_provider(f"{__name__}:Custom", {"CUSTOM_PREFIX": "X1"})
    assert provider.identify([header("1.9.1")])["1.9.1"].patient_id == "X1"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("NoDots", "not a dotted path"),
        ("sendit.no_such_module.Provider", "cannot import"),
        ("sendit.identifiers.dasher.NoSuchClass", "has no 'NoSuchClass'"),
        (f"{__name__}.NoIdentify", "no identify"),
        (f"{__name__}.NoSettingsKeyword", "'settings' keyword"),
    ],
)
def test_load_provider_errors_are_clear(path: str, message: str) -> None:
    with pytest.raises(ProviderLoadError, match=message):
        load_provider(path, {})
