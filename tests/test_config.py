"""Configuration: file + SENDIT_* overrides, one clear line per wrong value, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendit.config import ConfigError, load_config, write_config

SECRET = "s" * 40


def test_init_writes_a_fresh_secret_and_loads(tmp_path: Path) -> None:
    first = write_config(tmp_path / "a")
    second = write_config(tmp_path / "b")
    a = load_config(first, env={})
    b = load_config(second, env={})
    assert len(a.SECRET_KEY) >= 32 and a.SECRET_KEY != b.SECRET_KEY
    assert a.WORKERS == 5
    assert (tmp_path / "a" / "sendit-data" / "input").resolve() == a.INPUT_FOLDER
    assert a.DATABASE_URL.startswith("sqlite:///") and a.QUEUE_URL.startswith("sqlite:///")
    with pytest.raises(FileExistsError):
        write_config(tmp_path / "a")


def test_environment_overrides_file_and_original_alias(tmp_path: Path) -> None:
    path = tmp_path / "sendit.toml"
    path.write_text(f'SECRET_KEY = "{SECRET}"\nWORKERS = 3\nORTHAC_PORT = 4747\n')
    cfg = load_config(path, env={"SENDIT_WORKERS": "7", "SENDIT_SEND_TO_ORTHANC": "yes"})
    assert cfg.WORKERS == 7
    assert cfg.SEND_TO_ORTHANC is True
    assert cfg.ORTHANC_PORT == 4747  # the original design's misspelling still works


def test_each_wrong_value_gets_its_own_line_without_secrets(tmp_path: Path) -> None:
    path = tmp_path / "sendit.toml"
    path.write_text('SECRET_KEY = "short"\nWORKERS = "many"\nBOGUS = 1\n')
    env = {"SENDIT_ORTHANC_PORT": "99999", "SENDIT_DEBUG": "maybe", "SENDIT_DATABASE_URL": "mysql://u:pw@h/db"}
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    problems = info.value.problems
    assert any("WORKERS" in line and "'many'" in line for line in problems)
    assert any("unknown key BOGUS" in line for line in problems)
    assert any("SENDIT_ORTHANC_PORT" in line for line in problems)
    assert any("SENDIT_DEBUG" in line for line in problems)
    assert len(problems) == 4
    env.pop("SENDIT_ORTHANC_PORT"), env.pop("SENDIT_DEBUG")
    path.write_text('SECRET_KEY = "short"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    text = "\n".join(info.value.problems)
    assert "SECRET_KEY" in text and "DATABASE_URL" in text
    assert "pw" not in text and "short" not in text


def test_date_shift_range_must_allow_a_nonzero_shift(tmp_path: Path) -> None:
    env = {"SENDIT_SECRET_KEY": SECRET, "SENDIT_DATE_SHIFT_MIN_DAYS": "0", "SENDIT_DATE_SHIFT_MAX_DAYS": "0"}
    with pytest.raises(ConfigError, match="only 0 days"):
        load_config(None, env=env)


def test_masked_view_hides_secrets(tmp_path: Path) -> None:
    cfg = load_config(None, env={"SENDIT_SECRET_KEY": SECRET, "SENDIT_ORTHANC_PASSWORD": "hunter2hunter2"})
    shown = cfg.masked()
    assert SECRET not in str(shown) and "hunter2" not in str(shown)
    assert shown["SECRET_KEY"].endswith("(set)")


def test_watched_folder_may_not_hold_sendits_own_folders(tmp_path: Path) -> None:
    env = {"SENDIT_SECRET_KEY": SECRET, "SENDIT_DATA_DIR": str(tmp_path / "d"), "SENDIT_INPUT_FOLDER": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        load_config(None, env=env)
    text = "\n".join(info.value.problems)
    assert "WORK_FOLDER" in text and "OUTPUT_FOLDER" in text and "DATABASE_URL" in text


def test_a_configuration_that_delivers_nowhere_is_refused() -> None:
    with pytest.raises(ConfigError, match="delivered nowhere"):
        load_config(None, env={"SENDIT_SECRET_KEY": SECRET, "SENDIT_OUTPUT_FOLDER": "off"})
    assert (
        load_config(
            None, env={"SENDIT_SECRET_KEY": SECRET, "SENDIT_OUTPUT_FOLDER": "off", "SENDIT_SEND_TO_ORTHANC": "true"}
        ).OUTPUT_FOLDER
        is None
    )


# -- one typed object, declared once ---------------------------------------------------------------


def test_config_attributes_mirror_the_key_table() -> None:
    """Every key is a typed attribute of Config (so mypy rejects a misspelt one), in the table's order."""
    from dataclasses import fields
    from typing import get_origin, get_type_hints

    from sendit.config import KEYS, Config

    names = [f.name for f in fields(Config) if f.name != "source"]
    assert names == [key.name for key in KEYS]
    hints = get_type_hints(Config)
    for key in KEYS:
        expected = key.kind | None if key.optional else key.kind
        hint = hints[key.name]
        assert hint == expected or get_origin(hint) is expected, key.name


def test_a_value_of_the_wrong_type_is_refused_when_the_config_is_built() -> None:
    from dataclasses import replace

    cfg = load_config(None, env={"SENDIT_SECRET_KEY": SECRET})
    with pytest.raises(TypeError, match="WORKERS"):
        replace(cfg, WORKERS="3")
    with pytest.raises(TypeError, match="DATA_DIR"):
        replace(cfg, DATA_DIR=None)
    assert replace(cfg, OUTPUT_FOLDER=None).OUTPUT_FOLDER is None  # "off" is a value of its own


def test_identifier_service_keys_carry_their_real_types_and_defaults(tmp_path: Path) -> None:
    from sendit.config import Timeout

    cfg = load_config(None, env={"SENDIT_SECRET_KEY": SECRET})
    assert cfg.DASHER_MAX_ATTEMPTS == 4 and cfg.DASHER_MAX_ITEMS == 100 and cfg.DASHER_JITTER_BOUND == 3650
    assert isinstance(cfg.DASHER_TIMEOUT, Timeout) and cfg.DASHER_TIMEOUT == (5.0, 30.0)
    assert cfg.DASHER_ID_SOURCE == "Stanford MRN" and cfg.PATIENT_NAME_FORMAT == "{suid}"
    assert cfg.CUSTOM_FIELD_MAP == {}
    env = {"SENDIT_SECRET_KEY": SECRET, "SENDIT_DASHER_TIMEOUT": "2,20", "SENDIT_DASHER_MAX_ITEMS": "50"}
    cfg = load_config(None, env=env)
    assert cfg.DASHER_TIMEOUT == (2.0, 20.0) and cfg.DASHER_MAX_ITEMS == 50
    assert load_config(None, env={**env, "SENDIT_DASHER_TIMEOUT": "7"}).DASHER_TIMEOUT == (7.0, 7.0)
    # `sendit init` shows the real defaults
    text = write_config(tmp_path).read_text(encoding="utf-8")
    assert "# DASHER_MAX_ATTEMPTS = 4\n" in text and '# DASHER_TIMEOUT = "5,30"\n' in text


def test_custom_field_map_may_be_a_toml_table_or_a_json_string(tmp_path: Path) -> None:
    path = tmp_path / "sendit.toml"
    path.write_text(f'SECRET_KEY = "{SECRET}"\nCUSTOM_FIELD_MAP = {{ site = "ClinicalTrialSiteID" }}\n')
    assert load_config(path, env={}).CUSTOM_FIELD_MAP == {"site": "ClinicalTrialSiteID"}
    env = {"SENDIT_CUSTOM_FIELD_MAP": '{"arm": "ClinicalTrialSiteID"}'}
    assert load_config(path, env=env).CUSTOM_FIELD_MAP == {"arm": "ClinicalTrialSiteID"}


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("DASHER_TIMEOUT", "soon", "seconds"),
        ("DASHER_TIMEOUT", "1,2,3", "seconds"),
        ("DASHER_TIMEOUT", "0", "greater than 0"),
        ("DASHER_MAX_ATTEMPTS", "0", "between 1 and 20"),
        ("DASHER_MAX_ATTEMPTS", "1000", "between 1 and 20"),
        ("DASHER_MAX_ITEMS", "0", "between 1 and"),
        ("DASHER_JITTER_BOUND", "many", "whole number"),
        ("CUSTOM_FIELD_MAP", "[1, 2]", "JSON object"),
        ("CUSTOM_FIELD_MAP", "{not json", "JSON object"),
    ],
)
def test_identifier_service_values_are_checked_one_line_each(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"SENDIT_SECRET_KEY": SECRET, f"SENDIT_{name}": raw})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"SENDIT_{name}: ") and message in info.value.problems[0]


def test_identifier_service_settings_are_checked_at_start_up_when_used() -> None:
    env = {"SENDIT_SECRET_KEY": SECRET, "SENDIT_DEIDENTIFY_RESTFUL": "true", "SENDIT_DASHER_URL": "https://d.example"}
    with pytest.raises(ConfigError, match="DASHER_STUDY"):
        load_config(None, env=env)
    env.update(SENDIT_DASHER_STUDY="s", SENDIT_DASHER_TOKEN="hunter2hunter2", SENDIT_DASHER_ID_SOURCE=" ")
    with pytest.raises(ConfigError, match="DASHER_ID_SOURCE") as info:
        load_config(None, env=env)
    assert "hunter2" not in str(info.value)


def test_readme_configuration_table_is_the_key_table() -> None:
    """README's table is the key table, rendered: a key added, renamed or re-defaulted shows up here."""
    from sendit.config import KEYS, shown

    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in KEYS:
        name = f"`{key.name}`" + "".join(f" (alias `{alias}`)" for alias in key.aliases)
        default = shown(key, key.default)
        meaning = key.help + (" Secret: never shown." if key.secret else "")
        rows.append(f"| {name} | {f'`{default}`' if default else '(empty)'} | {meaning.replace('|', chr(92) + '|')} |")
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "\n".join(rows) + "\n" in readme, "\n".join(rows)


def test_every_line_sendit_init_writes_loads_back_to_the_default(tmp_path: Path) -> None:
    import re

    target = write_config(tmp_path / "a")
    text = target.read_text(encoding="utf-8")
    target.write_text(re.sub(r"(?m)^# ([A-Z_]+ = )", r"\1", text), encoding="utf-8")  # every key set
    everything = load_config(target, env={})
    defaults = load_config(write_config(tmp_path / "b"), env={})
    differ = [k for k in everything.values if everything.values[k] != defaults.values[k]]
    assert all(k in ("SECRET_KEY", "DATA_DIR") or k.endswith(("_FOLDER", "_URL")) for k in differ)
    assert "DASHER_TIMEOUT" not in differ and "CUSTOM_FIELD_MAP" not in differ


def test_docs_table_of_the_original_settings_is_the_code_table() -> None:
    """docs/configuration.md maps each setting of the original project as the start-up check does."""
    from sendit.config import ORIGINAL_SETTINGS

    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, original in ORIGINAL_SETTINGS.items():
        here = f"`{original.replaced_by}`" if original.replaced_by else "not needed"
        assert f"| `{name}` | {here} | {original.note} |\n" in text, name


def test_database_url_tls_options_reach_psycopg_and_the_queue_takes_rediss() -> None:
    """TLS to remote services: sslmode and friends were dropped without a word."""
    from sendit.config import database_settings

    url = "postgres://sendit:pw@db.example:5432/sendit?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem"
    settings = database_settings(url)
    assert settings["OPTIONS"] == {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/ca.pem"}
    assert settings["NAME"] == "sendit" and settings["HOST"] == "db.example"
    from sendit.config import load_config

    cfg = load_config(env={"SENDIT_SECRET_KEY": "k" * 40, "SENDIT_QUEUE_URL": "rediss://cache.example:6380/0"})
    assert cfg.QUEUE_URL.startswith("rediss://")
