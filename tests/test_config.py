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
