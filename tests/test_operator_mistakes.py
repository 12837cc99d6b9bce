"""An operator's mistake gets one line naming the key and the reason, and the same exit code everywhere.

Exit codes: 2 the configuration is wrong or this machine refuses it (a value, a folder, the web port, no
sendit.toml); 1 something Sendit needs does not answer (database, queue, identifier service,
destination). Never a traceback, never a password.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sendit.config import ConfigError, load_config

SECRET = "operator-mistakes-secret-key-0123456789-abcdef"
PASSWORD = "hunter2-not-for-eyes"

ReadOnly = Callable[[Path], tuple[list[str], str]]


# -- helpers ---------------------------------------------------------------------------------------


def problems_of(env: dict[str, str], path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    return info.value.problems


def user_env(config: Path | None, **extra: str) -> dict[str, str]:
    """A user's environment: no test settings, no DATABASE_URL leaking in from the test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENDIT_", "DJANGO_")) and k != "DATABASE_URL"}
    if config is not None:
        env["SENDIT_CONFIG"] = str(config)
    env.update(extra)
    return env


def sendit(
    cwd: Path, *args: str, env: dict[str, str], prefix: list[str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`sendit ARGS` as a user runs it; its whole process group is killed should it outlive ``timeout``."""
    command = [*(prefix or []), sys.executable, "-m", "sendit", *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=10)
        pytest.fail(f"sendit {' '.join(args)} did not end within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def naming(text: str, *words: str) -> list[str]:
    """The lines of ``text`` that hold every one of ``words``."""
    return [line for line in text.splitlines() if all(word in line for word in words)]


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str, stream: str = "stderr") -> str:
    """The command exited ``code``, without a traceback, and exactly one line names ``words``."""
    text = result.stdout if stream == "stdout" else result.stderr
    everything = result.stdout + result.stderr
    assert result.returncode == code, everything
    assert "Traceback" not in everything, everything
    lines = naming(text, *words)
    assert len(lines) == 1, everything
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def configured(tmp_path: Path) -> Path:
    """A folder with a sendit.toml, as `sendit init` leaves it (data in ./data)."""
    (tmp_path / "sendit.toml").write_text(f'SECRET_KEY = "{SECRET}"\nDATA_DIR = "data"\n', encoding="utf-8")
    return tmp_path


@pytest.fixture
def read_only() -> Iterator[ReadOnly]:
    """Make a folder read-only for one command: returns the command's prefix and the OS's reason.

    Root writes through permissions, so for root the command runs in a private mount namespace in
    which the folder is a read-only bind mount (the host's mounts are untouched); anyone else gets the
    folder without write permission."""
    changed: list[Path] = []

    def make(folder: Path) -> tuple[list[str], str]:
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            folder.chmod(0o555)
            changed.append(folder)
            return [], "Permission denied"
        unshare = shutil.which("unshare")
        if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
            pytest.skip("root without `unshare -rm`: cannot make a folder read-only for root")
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
        return [unshare, "-rm", "sh", "-c", script, str(folder)], "Read-only file system"

    yield make
    for folder in changed:
        folder.chmod(0o755)


# -- configuration values (fast) -----------------------------------------------------------------


def test_no_sendit_toml_here_says_run_sendit_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    problems = problems_of({})
    assert len(problems) == 1, problems
    assert "no sendit.toml" in problems[0] and "sendit init" in problems[0]
    assert "SECRET_KEY" not in problems[0]
    # the environment alone is a complete configuration when it holds the key
    assert load_config(None, env={"SENDIT_SECRET_KEY": SECRET}).source is None


def test_an_unknown_environment_variable_is_refused_with_a_did_you_mean(tmp_path: Path) -> None:
    problems = problems_of({"SENDIT_SECRET_KEY": SECRET, "SENDIT_ORTHANC_PROT": "4242"})
    assert len(problems) == 1, problems
    assert problems[0].startswith("SENDIT_ORTHANC_PROT: ") and "did you mean SENDIT_ORTHANC_PORT?" in problems[0]
    # the calling AE title's key is itself called SENDIT_AET: in the environment it is SENDIT_SENDIT_AET
    problems = problems_of({"SENDIT_SECRET_KEY": SECRET, "SENDIT_AET": "ME"})
    assert len(problems) == 1 and "did you mean SENDIT_SENDIT_AET?" in problems[0], problems
    problems = problems_of({"SENDIT_SECRET_KEY": SECRET, "SENDIT_XYZZY": "1"})
    assert len(problems) == 1 and problems[0].startswith("SENDIT_XYZZY: unknown"), problems


def test_variables_read_by_sendit_and_its_own_scripts_are_not_unknown(tmp_path: Path) -> None:
    config = tmp_path / "sendit.toml"
    config.write_text(f'SECRET_KEY = "{SECRET}"\n', encoding="utf-8")
    env = {
        "SENDIT_CONFIG": str(config),
        "SENDIT_TEST_POSTGRES_URL": "postgres://postgres@127.0.0.1:5432/sendit",  # scripts/test.sh
        "SENDIT_TEST_REDIS_URL": "redis://127.0.0.1:6379/15",  # scripts/test.sh
        "SENDIT_UPDATE_SCREENSHOTS": "1",  # tests/test_browser.py
    }
    assert load_config(None, env=env).source == config


def test_an_unknown_key_in_the_file_gets_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "sendit.toml"
    config.write_text(f'SECRET_KEY = "{SECRET}"\nORTHANC_PROT = 4242\nworkers = 3\n', encoding="utf-8")
    problems = problems_of({}, config)
    assert len(problems) == 2, problems
    assert any("unknown key ORTHANC_PROT" in p and "did you mean ORTHANC_PORT?" in p for p in problems)
    assert any("unknown key workers" in p and "did you mean WORKERS?" in p for p in problems)


@pytest.mark.parametrize("where", ["file", "environment"])
def test_the_port_and_its_original_misspelling_set_to_different_values_are_refused(tmp_path: Path, where: str) -> None:
    config = tmp_path / "sendit.toml"
    if where == "file":
        config.write_text(f'SECRET_KEY = "{SECRET}"\nORTHANC_PORT = 4242\nORTHAC_PORT = 4747\n', encoding="utf-8")
        env: dict[str, str] = {}
    else:
        config.write_text(f'SECRET_KEY = "{SECRET}"\n', encoding="utf-8")
        env = {"SENDIT_ORTHANC_PORT": "4242", "SENDIT_ORTHAC_PORT": "4747"}
    problems = problems_of(env, config)
    assert len(problems) == 1, problems
    assert "ORTHAC_PORT" in problems[0] and "ORTHANC_PORT" in problems[0] and "did you mean" in problems[0]
    assert "4242" in problems[0] and "4747" in problems[0]
    # the same value twice is no conflict
    if where == "file":
        config.write_text(f'SECRET_KEY = "{SECRET}"\nORTHANC_PORT = 4747\nORTHAC_PORT = 4747\n', encoding="utf-8")
    else:
        env["SENDIT_ORTHANC_PORT"] = "4747"
    assert load_config(config, env=env).ORTHANC_PORT == 4747


# Every setting of the original project (pydicom/sendit's settings/config.py and secrets.py) that is
# not one of ours, and the word that tells the operator what to do instead.
ORIGINAL = {
    "SOM_STUDY": "replaced by DASHER_STUDY",
    "ANONYMIZE_RESTFUL": "replaced by DEIDENTIFY_RESTFUL",
    "DEIDENTIFY_PIXELS": "replaced by DEID_FILTER",
    "ANONYMIZE_PIXELS": "replaced by DEID_FILTER",
    "STUDY_DEID": "replaced by DEID_RECIPE",
    "ENTITY_ID": "not needed",
    "ITEM_ID": "not needed",
    "DATA_BASE": "replaced by INPUT_FOLDER",
    "DATA_SUBFOLDER": "replaced by INPUT_FOLDER",
    "DATA_INPUT_FOLDERS": "replaced by INPUT_FOLDER",
    "GOOGLE_STORAGE_COLLECTION": "replaced by GOOGLE_STORAGE_PREFIX",
    "GOOGLE_PROJECT_NAME": "replaced by GOOGLE_PROJECT",
    "STANFORD_APPLICATION_CREDENTIALS": "replaced by DASHER_TOKEN_FILE",
}


@pytest.mark.parametrize(("name", "advice"), sorted(ORIGINAL.items()))
def test_a_setting_of_the_original_project_is_replaced_not_unknown(tmp_path: Path, name: str, advice: str) -> None:
    config = tmp_path / "sendit.toml"
    config.write_text(f'SECRET_KEY = "{SECRET}"\n{name} = "x"\n', encoding="utf-8")
    problems = problems_of({}, config)
    assert len(problems) == 1, problems
    assert name in problems[0] and advice in problems[0] and "unknown" not in problems[0]
    config.write_text(f'SECRET_KEY = "{SECRET}"\n', encoding="utf-8")
    problems = problems_of({f"SENDIT_{name}": "x"}, config)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"SENDIT_{name}: ") and advice in problems[0] and "unknown" not in problems[0]


def test_the_docs_map_every_setting_of_the_original_project() -> None:
    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    for name, advice in ORIGINAL.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, name
        replacement = advice.removeprefix("replaced by ").removeprefix("not needed")
        assert replacement in rows[0], rows[0]
    for name in ("SECRET_KEY", "DEBUG", "DEIDENTIFY_RESTFUL", "SEND_TO_ORTHANC", "ORTHANC_IPADDRESS", "ORTHAC_PORT"):
        assert [line for line in text.splitlines() if line.startswith(f"| `{name}` |")], name


def test_a_password_in_a_url_is_masked_wherever_the_configuration_is_shown() -> None:
    env = {
        "SENDIT_SECRET_KEY": SECRET,
        "SENDIT_ORTHANC_URL": f"http://orthanc:{PASSWORD}@pacs.example:8042",
        "SENDIT_DATABASE_URL": f"postgres://sendit:{PASSWORD}@db.example:5432/sendit",
        "SENDIT_QUEUE_URL": f"redis://:{PASSWORD}@redis.example:6379/0",
    }
    shown = load_config(None, env=env).masked()
    assert PASSWORD not in str(shown)
    assert shown["ORTHANC_URL"] == "http://orthanc:***@pacs.example:8042"
    assert shown["DATABASE_URL"] == "postgres://sendit:***@db.example:5432/sendit"
    assert shown["QUEUE_URL"] == "redis://:***@redis.example:6379/0"


# -- the commands (subprocesses) -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "status", "run"])
def test_a_read_only_data_dir_is_one_line_in_every_command(configured: Path, read_only: ReadOnly, command: str) -> None:
    prefix, reason = read_only(configured / "data")
    args = [command, "--port", str(free_port())] if command == "run" else [command]
    result = sendit(configured, *args, env=user_env(configured / "sendit.toml"), prefix=prefix)
    stream = "stdout" if command == "check" else "stderr"
    line = one_line(result, 2, "DATA_DIR", reason, stream=stream)
    assert str(configured / "data") in line


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "status"])
def test_a_work_folder_under_a_file_is_one_line(configured: Path, command: str) -> None:
    (configured / "afile").write_text("not a folder", encoding="utf-8")
    env = user_env(configured / "sendit.toml", SENDIT_WORK_FOLDER=str(configured / "afile" / "work"))
    result = sendit(configured, command, env=env)
    one_line(result, 2, "WORK_FOLDER", "Not a directory", stream="stdout" if command == "check" else "stderr")


@pytest.mark.slow
def test_check_gives_the_reason_a_read_only_input_folder_fails(configured: Path, read_only: ReadOnly) -> None:
    prefix, reason = read_only(configured / "incoming")
    env = user_env(configured / "sendit.toml", SENDIT_INPUT_FOLDER=str(configured / "incoming"))
    result = sendit(configured, "check", env=env, prefix=prefix)
    line = one_line(result, 2, "INPUT_FOLDER", reason, stream="stdout")
    assert "[FAIL]" in line


@pytest.mark.slow
def test_check_reports_the_web_port_in_use(configured: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = user_env(configured / "sendit.toml", SENDIT_WEB_PORT=str(port))
        result = sendit(configured, "check", env=env)
    line = one_line(result, 2, "WEB_PORT", "Address already in use", stream="stdout")
    assert f"127.0.0.1:{port}" in line and "[FAIL]" in line
    free = sendit(configured, "check", env=user_env(configured / "sendit.toml", SENDIT_WEB_PORT=str(free_port())))
    assert free.returncode == 0, free.stdout + free.stderr
    assert naming(free.stdout, "[ok]", "WEB_PORT")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check", "status"])
def test_no_sendit_toml_in_the_folder_says_run_sendit_init(tmp_path: Path, command: str) -> None:
    result = sendit(tmp_path, command, env=user_env(None))
    line = one_line(result, 2, "no sendit.toml", "sendit init")
    assert "SECRET_KEY" not in result.stderr, line
    assert not (tmp_path / "sendit-data").exists()  # nothing made for a configuration that is not there


@pytest.mark.slow
def test_an_unknown_environment_variable_stops_the_command_with_a_did_you_mean(configured: Path) -> None:
    result = sendit(configured, "status", env=user_env(configured / "sendit.toml", SENDIT_WORKRES="3"))
    one_line(result, 2, "SENDIT_WORKRES", "did you mean SENDIT_WORKERS?")


@pytest.mark.slow
def test_passwords_are_masked_in_check_and_in_status_json(configured: Path) -> None:
    closed = free_port()
    env = user_env(
        configured / "sendit.toml",
        SENDIT_ORTHANC_URL=f"http://orthanc:{PASSWORD}@127.0.0.1:{closed}",
        SENDIT_WEB_PORT=str(free_port()),
    )
    result = sendit(configured, "check", env=env)
    assert PASSWORD not in result.stdout + result.stderr
    assert f"ORTHANC_URL = http://orthanc:***@127.0.0.1:{closed}" in result.stdout
    assert result.returncode == 1  # the destination does not answer
    (configured / "nothing").mkdir()
    made = sendit(configured, "import", "--wait", str(configured / "nothing"), env=env)  # makes the database
    assert made.returncode == 0, made.stdout + made.stderr
    status = sendit(configured, "status", "--json", env=env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert PASSWORD not in status.stdout + status.stderr
    assert '"destinations"' in status.stdout
    env["SENDIT_DATABASE_URL"] = f"postgres://sendit:{PASSWORD}@127.0.0.1:{closed}/sendit"
    status = sendit(configured, "status", "--json", env=env)
    assert PASSWORD not in status.stdout + status.stderr
    line = one_line(status, 1, "DATABASE_URL")
    assert f"postgres://sendit:***@127.0.0.1:{closed}/sendit" in line


@pytest.mark.slow
def test_debug_on_warns_at_start(configured: Path) -> None:
    """Every command that starts Django (run, worker, status, check, ...) warns; check is the quick one."""
    env = user_env(configured / "sendit.toml", SENDIT_DEBUG="true", SENDIT_WEB_PORT=str(free_port()))
    one_line(sendit(configured, "check", env=env), 0, "DEBUG", "production")
    env.pop("SENDIT_DEBUG")
    quiet = sendit(configured, "check", env=env)
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr, quiet.stderr


@pytest.mark.slow
def test_check_reports_database_queue_and_identifier_service_that_do_not_answer(configured: Path) -> None:
    closed = free_port()
    env = user_env(
        configured / "sendit.toml",
        SENDIT_WEB_PORT=str(free_port()),
        SENDIT_DATABASE_URL=f"postgres://sendit:{PASSWORD}@127.0.0.1:{closed}/sendit",
        SENDIT_QUEUE_URL=f"redis://:{PASSWORD}@127.0.0.1:{closed}/0",
        SENDIT_DEIDENTIFY_RESTFUL="true",
        SENDIT_DASHER_URL=f"http://127.0.0.1:{closed}/api",
        SENDIT_DASHER_STUDY="study-1",
        SENDIT_DASHER_TOKEN="t0ken-t0ken",
    )
    result = sendit(configured, "check", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr and PASSWORD not in result.stdout + result.stderr
    for key in ("DATABASE_URL", "QUEUE_URL", "DASHER_URL"):
        assert len(naming(result.stdout, "[FAIL]", key, f"127.0.0.1:{closed}")) == 1, result.stdout


@pytest.mark.slow
def test_check_says_ok_for_database_queue_and_identifier_service_that_answer(
    configured: Path, dasher_server: object
) -> None:
    from tests.dasher_server import DasherServer

    assert isinstance(dasher_server, DasherServer)
    env = user_env(
        configured / "sendit.toml",
        SENDIT_WEB_PORT=str(free_port()),
        SENDIT_DEIDENTIFY_RESTFUL="true",
        SENDIT_DASHER_URL=dasher_server.url,
        SENDIT_DASHER_STUDY="study-1",
        SENDIT_DASHER_TOKEN=dasher_server.initial_token,
    )
    result = sendit(configured, "check", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for key in ("DATABASE_URL", "QUEUE_URL", "DASHER_URL", "WEB_PORT"):
        assert len(naming(result.stdout, "[ok]", key)) == 1, result.stdout
    assert dasher_server.requests == []  # asked nothing about anyone
