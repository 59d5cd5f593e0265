"""Configuration: precedence flags > environment > env file > default, and every validation
error naming the key and where the bad value came from."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import run_cli

from r2d2voice.appliance.compose import check_listening
from r2d2voice.errors import ConfigError, UsageError
from r2d2voice.system.config import DEFAULT_MODEL, Settings, default_db_path, load_settings


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    return cwd, home


def load(dirs: tuple[Path, Path], environ: dict[str, str] | None = None, **kw: object) -> Settings:
    cwd, home = dirs
    return load_settings(environ=environ or {}, cwd=cwd, home=home, **kw)  # type: ignore[arg-type]


def test_defaults(dirs: tuple[Path, Path]) -> None:
    s = load(dirs)
    assert s.backend == "openai" and s.model == DEFAULT_MODEL and s.voice == "alloy"
    assert s.realtime_url == "wss://api.openai.com/v1/realtime"
    assert s.transcribe_model == "gpt-4o-transcribe"
    assert (s.vad_threshold, s.vad_silence_ms, s.vad_prefix_ms) == (0.5, 500, 300)
    assert s.api_key is None and s.env_file is None
    assert s.sources["voice"] == "default"


def test_default_model_is_a_current_ga_model_the_sdk_knows() -> None:
    sdk = Path(__import__("openai").__file__).parent / "types" / "realtime"
    text = (sdk / "realtime_session_create_request_param.py").read_text()
    assert f'"{DEFAULT_MODEL}"' in text
    deprecated = text.split("Deprecated values:")[1].split('"""')[0]
    assert f'"{DEFAULT_MODEL}"' not in deprecated


def test_precedence_flag_over_env_over_file(dirs: tuple[Path, Path]) -> None:
    cwd, _ = dirs
    (cwd / ".env").write_text("REALTIME_VOICE=from_file\nR2D2_VAD_SILENCE_MS=800\n"
                              "REALTIME_MODEL=file-model\n")
    s = load(dirs, {"REALTIME_VOICE": "from_env", "REALTIME_MODEL": "env-model"},
             flags={"REALTIME_MODEL": ("flag-model", "--model")})
    assert s.voice == "from_env" and s.sources["voice"] == "environment"
    assert s.vad_silence_ms == 800 and s.sources["vad_silence_ms"] == str(cwd / ".env")
    assert s.model == "flag-model" and s.sources["model"] == "--model"
    # a flag left unset (None) does not hide lower layers
    s = load(dirs, {}, flags={"REALTIME_VOICE": (None, "--voice")})
    assert s.voice == "from_file"


def test_env_file_lookup_order(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    cwd, home = dirs
    (home / ".r2d2").mkdir()
    (home / ".r2d2" / ".env").write_text("REALTIME_VOICE=home\n")
    assert load(dirs).voice == "home"
    (cwd / ".env").write_text("REALTIME_VOICE=cwd\n")
    assert load(dirs).voice == "cwd"
    explicit = tmp_path / "x.env"
    explicit.write_text("REALTIME_VOICE=explicit\n")
    s = load(dirs, env_file=explicit)
    assert s.voice == "explicit" and s.env_file == explicit


def test_missing_explicit_env_file_is_a_bad_invocation(dirs: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError, match=r"^--env-file nope\.env: no such file$"):
        load(dirs, env_file="nope.env")


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("R2D2_VAD_THRESHOLD", "high", "a number between 0 and 1"),
        ("R2D2_VAD_THRESHOLD", "1.5", "a number between 0 and 1"),
        ("R2D2_VAD_SILENCE_MS", "50", "between 100 and 10000"),
        ("R2D2_VAD_SILENCE_MS", "0.5s", "whole number"),
        ("R2D2_VAD_PREFIX_MS", "-1", "between 0 and 5000"),
        ("R2D2_BACKEND", "bing", "'openai', 'local', 'azure' or 'live'"),
        ("R2D2_LISTEN", "sometimes", "'always' or 'wake'"),
        ("R2D2_EARCONS", "loud", "on or off"),
        ("R2D2_STORE_TEXT", "maybe", "'true' or 'false'"),
        ("R2D2_CONVERSATION_IDLE_S", "0", "between 1 and 3600"),
        ("R2D2_RETENTION_DAYS", "0", "'off' (keep everything) or a number of days, at least 0.01"),
        ("AZURE_OPENAI_ENDPOINT", "NAME.openai.azure.com", "https:// (or wss://) URL"),
        ("R2D2_LOG_LEVEL", "loud", "one of DEBUG"),
        ("REALTIME_URL", "https://api.openai.com", "ws:// or wss://"),
        ("R2D2_OUTPUT_LATENCY", "fast", "seconds"),
    ],
)
def test_every_validation_error_names_key_source_and_value(
    dirs: tuple[Path, Path], key: str, value: str, rule: str
) -> None:
    cwd, _ = dirs
    env_file = cwd / ".env"
    env_file.write_text(f"{key}={value}\n")
    with pytest.raises(ConfigError) as err:
        load(dirs)
    msg = str(err.value)
    assert msg.startswith(f"{key} in {env_file} must be") and rule in msg
    assert repr(value) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=f"{key} in the environment must be"):
        load(dirs, {key: value})
    with pytest.raises(UsageError, match="on the command line"):  # a bad invocation: exit 2
        load(dirs, flags={key: (value, "--x")})


def test_key_is_required_only_for_openai_and_never_shown(dirs: tuple[Path, Path]) -> None:
    s = load(dirs)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        s.require_api_key()
    s = load(dirs, {"OPENAI_API_KEY": "sk-secret-123456", "R2D2_BACKEND": "local"})
    assert s.require_api_key() == "sk-secret-123456"
    assert "sk-secret" not in repr(s) and "sk-secret" not in str(s)


def test_warns_once_when_env_file_with_key_is_world_readable(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cwd, _ = dirs
    env_file = cwd / ".env"
    env_file.write_text("OPENAI_API_KEY=sk-abcdef123456\n")
    os.chmod(env_file, 0o644)
    with caplog.at_level(logging.WARNING):
        load(dirs)
        load(dirs)
    warnings = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(warnings) == 1
    assert "sk-abcdef" not in caplog.text
    caplog.clear()
    os.chmod(env_file, 0o600)
    (cwd / "other").mkdir()
    load((cwd / "other", dirs[1]), env_file=env_file)
    assert "readable" not in caplog.text


def test_db_path_defaults() -> None:
    assert default_db_path({"STATE_DIRECTORY": "/var/lib/r2d2voice"}) == \
        Path("/var/lib/r2d2voice/conversations.db")
    assert default_db_path({"STATE_DIRECTORY": "/a:/b"}) == Path("/a/conversations.db")
    assert default_db_path({"XDG_DATA_HOME": "/x"}) == Path("/x/r2d2voice/conversations.db")
    assert default_db_path({}) == Path.home() / ".local/share/r2d2voice/conversations.db"


def test_db_flag_and_env(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    s = load(dirs, {"R2D2_DB": str(tmp_path / "env.db")})
    assert s.db == tmp_path / "env.db"
    s = load(dirs, {"R2D2_DB": "x"}, flags={"R2D2_DB": (str(tmp_path / "flag.db"), "--db")})
    assert s.db == tmp_path / "flag.db"


def test_cli_config_error_is_one_line_exit_3(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("R2D2_VAD_THRESHOLD=high\n")
    r = run_cli("sessions", cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "R2D2_VAD_THRESHOLD in" in r.stderr and "'high'" in r.stderr
    r = run_cli("--env-file", "missing.env", "sessions", cwd=tmp_path)  # the command line
    assert r.returncode == 2
    assert r.stderr == "r2d2voice: error: --env-file missing.env: no such file\n"


def test_new_settings_parse(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    s = load(dirs, {"R2D2_LISTEN": "WAKE", "R2D2_EARCONS": "off", "R2D2_STORE_TEXT": "no",
                    "R2D2_RETENTION_DAYS": "30", "R2D2_CONVERSATION_IDLE_S": "7.5",
                    "R2D2_TOOLS": "~/tools.toml", "R2D2_DEVICE_ID": "r2-kitchen",
                    "R2D2_BACKEND": "azure"})
    assert (s.listen, s.earcons, s.store_text, s.retention_days) == ("wake", False, False, 30.0)
    assert s.conversation_idle_s == 7.5 and s.device_id == "r2-kitchen"
    assert s.tools == str(Path.home() / "tools.toml") and s.backend == "azure"
    off = load(dirs, {"R2D2_RETENTION_DAYS": "off", "R2D2_EARCONS": "on"})
    assert off.retention_days is None and off.earcons is True and off.device_id is None


def test_a_directory_is_not_a_database(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"R2D2_DB in the environment must be a file path "
                                          r"\(not a directory\)"):
        load(dirs, {"R2D2_DB": str(tmp_path)})
    r = run_cli("export", cwd=tmp_path, env={"R2D2_DB": str(tmp_path)})
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "not a directory" in r.stderr and "Traceback" not in r.stderr


SHIP = "postgresql://r2d2:p%40ss-w0rd-1@fleet.example:5432/fleet"


def test_secrets_are_masked_everywhere(dirs: tuple[Path, Path]) -> None:
    s = load(dirs, {"OPENAI_API_KEY": "sk-open-123456", "AZURE_OPENAI_API_KEY": "az-key-987654",
                    "R2D2_SHIP_URL": SHIP})
    for secret in ("sk-open-123456", "az-key-987654", "p%40ss-w0rd-1", "p@ss-w0rd-1"):
        assert secret not in repr(s)
    assert "ship_url='***'" in repr(s) and "azure_api_key='***'" in repr(s)
    # what the logs scrub: the keys, the URL, its password as written and decoded
    assert set(s.secrets()) == {"sk-open-123456", "az-key-987654", SHIP, "p%40ss-w0rd-1",
                                "p@ss-w0rd-1"}
    # a bad value of a secret key is not echoed in the error either
    with pytest.raises(ConfigError) as err:
        load(dirs, {"R2D2_SHIP_URL": "postgrse://u:hunter22@h/db"})
    assert "hunter22" not in str(err.value) and "'postgrse://u:***@h/db'" in str(err.value)
    with pytest.raises(ConfigError) as err:  # no password: nothing to hide
        load(dirs, {"R2D2_SHIP_URL": "notaurl"})
    assert str(err.value).endswith("must be a postgresql:// URL, got 'notaurl'")


def test_the_ship_url_password_never_reaches_the_log(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"R2D2_SHIP_URL={SHIP}\n")
    r = run_cli("--log-level", "DEBUG", "ship", "--db", str(tmp_path / "none.db"),
                cwd=tmp_path)
    assert r.returncode == 2 and "no such database" in r.stderr, r.stderr
    assert "p%40ss-w0rd-1" not in r.stderr + r.stdout and "p@ss" not in r.stderr + r.stdout


def test_misspelt_keys_are_warned_about_with_the_closest_key(
    dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cwd, _ = dirs
    env_file = cwd / ".env"
    env_file.write_text("R2D2_VAD_TRESHOLD=0.9\nREALTIME_VOICE=ash\nOTHER_TOOL_KEY=1\n")
    with caplog.at_level(logging.WARNING, logger="r2d2voice.system.config"):
        s = load(dirs, {"REALTIME_MODLE": "x", "R2D2_VAD_THRESHOLD": "0.4", "PATH": "/bin"})
    assert s.vad_threshold == 0.4 and s.voice == "ash"
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"unknown setting R2D2_VAD_TRESHOLD in {env_file} is ignored "
        "(did you mean R2D2_VAD_THRESHOLD?)",
        "unknown setting REALTIME_MODLE in the environment is ignored "
        "(did you mean REALTIME_MODEL?)",
    ]


def test_env_file_parse_warnings_name_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("REALTIME_VOICE=ash\nthis line is not a setting\n")
    r = run_cli("sessions", "--db", str(tmp_path / "none.db"), cwd=tmp_path)
    [warning] = [line for line in r.stderr.splitlines() if "WARNING" in line]
    assert f"{tmp_path / '.env'} line 2: cannot parse it" in warning
    assert "python-dotenv" not in r.stderr


@pytest.mark.parametrize("named", [True, False])
def test_an_unreadable_env_file_is_one_line(tmp_path: Path, named: bool) -> None:
    """Exit 2 when --env-file names it (the command line), 3 when found as ./.env."""
    env_file = tmp_path / ("secret.env" if named else ".env")
    env_file.write_text("REALTIME_VOICE=ash\n")
    env_file.chmod(0)
    argv = [sys.executable, "-m", "r2d2voice",
            *(["--env-file", str(env_file)] if named else []), "sessions"]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == (2 if named else 3), r.stderr
    assert r.stderr == f"r2d2voice: error: cannot read env file {env_file}: Permission denied\n"


def test_the_wake_word_is_checked_only_when_listening_for_it(dirs: tuple[Path, Path]) -> None:
    check_listening(load(dirs, {"R2D2_WAKE_WORD": "hey_bob"}))  # always: not used, not checked
    check_listening(load(dirs, {"R2D2_LISTEN": "wake"}))  # the default word is bundled
    with pytest.raises(ConfigError) as err:
        check_listening(load(dirs, {"R2D2_LISTEN": "wake", "R2D2_WAKE_WORD": "hey_bob"}))
    assert str(err.value).startswith("R2D2_WAKE_WORD in the environment: unknown wake word "
                                     "'hey_bob': use one of okay_nabu, hey_jarvis, hey_mycroft,")


def test_a_bad_wake_word_stops_a_replay_before_it_starts(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("R2D2_WAKE_WORD=hey_bob\n")
    r = run_cli("replay", "missing.wav", "--backend", "local", "--listen", "wake",
                "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith(f"r2d2voice: error: R2D2_WAKE_WORD in {tmp_path / '.env'}: ")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "c.db").exists()
