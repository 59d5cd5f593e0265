"""Configuration: precedence flags > environment > env file > default, and every validation
error naming the key and where the bad value came from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from support import run_cli

from r2d2voice.errors import ConfigError
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


def test_missing_explicit_env_file_is_a_config_error(dirs: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"nope\.env does not exist"):
        load(dirs, env_file="nope.env")


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("R2D2_VAD_THRESHOLD", "high", "a number between 0 and 1"),
        ("R2D2_VAD_THRESHOLD", "1.5", "a number between 0 and 1"),
        ("R2D2_VAD_SILENCE_MS", "50", "between 100 and 10000"),
        ("R2D2_VAD_SILENCE_MS", "0.5s", "whole number"),
        ("R2D2_VAD_PREFIX_MS", "-1", "between 0 and 5000"),
        ("R2D2_BACKEND", "azure", "'openai' or 'local'"),
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
    with pytest.raises(ConfigError, match="on the command line"):
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
    r = run_cli("--env-file", "missing.env", "sessions", cwd=tmp_path)
    assert r.returncode == 3 and "missing.env does not exist" in r.stderr
