"""Settings from CLI flags > process environment > env file, validated into one frozen object.

No trio, no sounddevice: importing this module is cheap.
"""

from __future__ import annotations

import difflib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from r2d2voice.errors import ConfigError, UsageError

log = logging.getLogger("r2d2voice.system.config")

DEFAULT_URL = "wss://api.openai.com/v1/realtime"
DEFAULT_LIVE_URL = "wss://api.openai.com/v1/live/sessions"
#: Newest GA realtime model that the openai SDK does not list as deprecated.
DEFAULT_MODEL = "gpt-realtime-2.1"
DEFAULT_INSTRUCTIONS = (
    "You are R2, a small friendly robot. Answer briefly and warmly, in one or two short sentences."
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BACKENDS = ("openai", "local", "azure", "live")
DUPLEX_MODES = ("half", "full")
#: the wire protocol the embedded local backend speaks (backend local)
LOCAL_PROTOCOLS = ("realtime", "live")
ECHO_MODES = ("aec", "half", "off")
NOISE_REDUCTIONS = ("near_field", "far_field", "off")
TURN_DETECTIONS = ("server_vad", "semantic_vad")
EAGERNESS = ("low", "medium", "high", "auto")
LISTEN_MODES = ("always", "wake")
#: URL schemes of a fleet server (PostgreSQL): ``R2D2_DB``/``--db`` may name one for reports.
FLEET_SCHEMES = ("postgresql://", "postgres://")
#: Prefixes of the keys that are ours: an unknown one in the environment or an env file is
#: probably a misspelt setting, and is warned about.
OWN_PREFIXES = ("R2D2_", "REALTIME_")


@dataclass(frozen=True)
class Key:
    """One configuration key: its env name, default and parser."""

    env: str
    attr: str
    default: Any
    parse: Callable[[str], Any]
    rule: str  # what a valid value looks like, for the error message
    doc: str
    secret: bool = False  # never shown: not in errors, repr, logs


def _str(v: str) -> str:
    return v


def _opt_str(v: str) -> str | None:
    return v or None


def _number(lo: float, hi: float) -> Callable[[str], float]:
    def parse(v: str) -> float:
        x = float(v)
        if not lo <= x <= hi:
            raise ValueError
        return x

    return parse


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(v: str) -> int:
        x = int(v)
        if not lo <= x <= hi:
            raise ValueError
        return x

    return parse


def _choice(options: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(v: str) -> str:
        x = v.strip().upper() if upper else v.strip().lower()
        if x not in options:
            raise ValueError
        return x

    return parse


def _off_or_number(lo: float, hi: float) -> Callable[[str], float | None]:
    number = _number(lo, hi)

    def parse(v: str) -> float | None:
        return None if v.strip().lower() in ("off", "none", "") else number(v)

    return parse


def _flag(v: str) -> bool:
    x = v.strip().lower()
    if x in ("true", "yes", "on", "1"):
        return True
    if x in ("false", "no", "off", "0"):
        return False
    raise ValueError


def _url(v: str) -> str:
    if not v.startswith(("ws://", "wss://")):
        raise ValueError
    return v


def _service_url(v: str) -> str | None:
    if not v:
        return None
    if not v.startswith(("https://", "wss://", "http://", "ws://")) or not urlsplit(v).hostname:
        raise ValueError
    return v


def _postgres_url(v: str) -> str | None:
    if not v:
        return None
    if not v.lower().startswith(("postgresql://", "postgres://")):
        raise ValueError
    return v


def _mqtt_url(v: str) -> str | None:
    if not v:
        return None
    if not v.lower().startswith(("mqtt://", "mqtts://")) or not urlsplit(v).hostname:
        raise ValueError
    return v


def _mqtt_prefix(v: str) -> str:
    v = v.strip().strip("/")
    if not v or any(c in v for c in "+#\0"):
        raise ValueError
    return v


def _off_or_int(lo: int, hi: int) -> Callable[[str], int | None]:
    number = _int(lo, hi)

    def parse(v: str) -> int | None:
        return None if v.strip().lower() in ("off", "none", "") else number(v)

    return parse


def _host_port(v: str) -> str | None:
    """``HOST:PORT`` (``[::1]:9464`` for an IPv6 address), or None for off."""
    text = v.strip()
    if text.lower() in ("off", "none", ""):
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c in host for c in "[]/ ") or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise ValueError
    return text


def _path(v: str) -> str | None:
    return str(Path(v).expanduser()) if v else None


def is_fleet_url(v: str) -> bool:
    """``v`` names a fleet server (``postgresql://…``) rather than a database file."""
    return v.lower().startswith(FLEET_SCHEMES)


def _db_path(v: str) -> str | None:
    if v and not is_fleet_url(v) and Path(v).expanduser().is_dir():
        raise ValueError
    return v or None


KEYS: tuple[Key, ...] = (
    Key("OPENAI_API_KEY", "api_key", None, _opt_str, "an API key", "API key (backend openai)",
        secret=True),
    Key("REALTIME_URL", "realtime_url", DEFAULT_URL, _url, "a ws:// or wss:// URL",
        "Realtime websocket endpoint"),
    Key("REALTIME_MODEL", "model", DEFAULT_MODEL, _str, "a model name", "Realtime model"),
    Key("REALTIME_VOICE", "voice", "alloy", _str, "a voice name", "reply voice"),
    Key("R2D2_INSTRUCTIONS", "instructions", DEFAULT_INSTRUCTIONS, _str, "text",
        "system instructions"),
    Key("R2D2_TRANSCRIBE_MODEL", "transcribe_model", "gpt-4o-transcribe", _str, "a model name",
        "model transcribing the user's speech"),
    Key("R2D2_BACKEND", "backend", "openai", _choice(BACKENDS),
        "'openai', 'local', 'azure' or 'live'", "service to talk to"),
    Key("R2D2_LIVE_URL", "live_url", DEFAULT_LIVE_URL, _url, "a ws:// or wss:// URL",
        "GPT-Live websocket endpoint (backend live)"),
    Key("R2D2_LIVE_MODEL", "live_model", "gpt-live-1", _str, "a model name",
        "GPT-Live model (backend live)"),
    Key("R2D2_LIVE_VOICE", "live_voice", "marin", _str, "a voice name",
        "GPT-Live voice (backend live)"),
    Key("R2D2_LIVE_DELEGATE_MODEL", "live_delegate_model", "gpt-5.5", _str, "a model name",
        "Responses model GPT-Live hands tool calls to (backend live, with tools)"),
    Key("R2D2_LOCAL_PROTOCOL", "local_protocol", "realtime", _choice(LOCAL_PROTOCOLS),
        "'realtime' or 'live'", "protocol of the embedded local backend (backend local)"),
    Key("AZURE_OPENAI_ENDPOINT", "azure_endpoint", None, _service_url,
        "an https:// (or wss://) URL such as https://NAME.openai.azure.com",
        "Azure OpenAI resource (backend azure)"),
    Key("AZURE_OPENAI_DEPLOYMENT", "azure_deployment", None, _opt_str, "a deployment name",
        "Azure deployment of a realtime model (backend azure)"),
    Key("AZURE_OPENAI_API_KEY", "azure_api_key", None, _opt_str, "an API key",
        "Azure OpenAI key (backend azure)", secret=True),
    Key("R2D2_DB", "db", None, _db_path, "a file path (not a directory)",
        "transcript database"),
    Key("R2D2_SHIP_URL", "ship_url", None, _postgres_url, "a postgresql:// URL",
        "fleet server to ship transcripts to", secret=True),
    Key("R2D2_DEVICE_ID", "device_id", None, _opt_str, "a name",
        "this robot's name in the fleet (default: the hostname)"),
    Key("R2D2_TOOLS", "tools", None, _path, "the path of a tools file",
        "function tools the model may call"),
    Key("R2D2_MQTT_URL", "mqtt_url", None, _mqtt_url, "an mqtt:// or mqtts:// URL",
        "MQTT broker for Home Assistant (docs/body.md)", secret=True),
    Key("R2D2_MQTT_PREFIX", "mqtt_prefix", "homeassistant", _mqtt_prefix,
        "an MQTT topic without wildcards", "Home Assistant's discovery prefix"),
    Key("R2D2_MQTT_CA", "mqtt_ca", None, _path, "the path of a PEM file",
        "CA certificates an mqtts:// broker is checked against (default: the system's)"),
    Key("R2D2_LISTEN", "listen", "always", _choice(LISTEN_MODES), "'always' or 'wake'",
        "wake: a conversation starts with the wake word"),
    Key("R2D2_WAKE_WORD", "wake_word", "hey_mycroft", _str,
        "a bundled wake word or the path of a microWakeWord model", "wake word (listen=wake)"),
    Key("R2D2_CONVERSATION_IDLE_S", "conversation_idle_s", 20.0, _number(1.0, 3600.0),
        "a number of seconds between 1 and 3600", "silence that ends a conversation (wake)"),
    Key("R2D2_EARCONS", "earcons", True, _flag, "on or off",
        "short sounds when a conversation starts and ends, and when a spent budget refuses"),
    Key("R2D2_INPUT_DEVICE", "input_device", None, _opt_str, "a device index or name",
        "microphone"),
    Key("R2D2_OUTPUT_DEVICE", "output_device", None, _opt_str, "a device index or name",
        "speaker"),
    Key("R2D2_OUTPUT_LATENCY", "output_latency", 0.03, _number(0.0, 2.0),
        "a number of seconds between 0 and 2", "speaker latency"),
    Key("R2D2_VAD_THRESHOLD", "vad_threshold", 0.5, _number(0.0, 1.0),
        "a number between 0 and 1", "server VAD threshold"),
    Key("R2D2_VAD_SILENCE_MS", "vad_silence_ms", 500, _int(100, 10_000),
        "a whole number of ms between 100 and 10000", "silence that ends a turn"),
    Key("R2D2_VAD_PREFIX_MS", "vad_prefix_ms", 300, _int(0, 5_000),
        "a whole number of ms between 0 and 5000", "audio kept before speech starts"),
    Key("R2D2_LOG_LEVEL", "log_level", "INFO", _choice(LOG_LEVELS, upper=True),
        "one of DEBUG, INFO, WARNING, ERROR", "log level"),
    Key("R2D2_ECHO", "echo", "aec", _choice(ECHO_MODES), "'aec', 'half' or 'off'",
        "aec: echo canceller, full duplex; half: mic muted while the robot speaks; off"),
    Key("R2D2_DUPLEX", "duplex", "half", _choice(DUPLEX_MODES), "'half' or 'full'",
        "old name: half = R2D2_ECHO=half, full = R2D2_ECHO=off (when R2D2_ECHO is not set)"),
    Key("R2D2_NOISE_REDUCTION", "noise_reduction", "far_field", _choice(NOISE_REDUCTIONS),
        "'near_field', 'far_field' or 'off'", "the service's input noise reduction"),
    Key("R2D2_TURN_DETECTION", "turn_detection", "server_vad", _choice(TURN_DETECTIONS),
        "'server_vad' or 'semantic_vad'", "how the service decides a turn has ended"),
    Key("R2D2_VAD_EAGERNESS", "vad_eagerness", "auto", _choice(EAGERNESS),
        "'low', 'medium', 'high' or 'auto'", "semantic_vad: how soon the robot answers"),
    Key("R2D2_ECHO_TAIL_MS", "echo_tail_ms", 300, _int(0, 5_000),
        "a whole number of ms between 0 and 5000", "mic stays muted this long after a reply"),
    Key("R2D2_BARGE_IN_DBFS", "barge_in_dbfs", -25.0, _off_or_number(-90.0, 0.0),
        "'off' or a level in dBFS between -90 and 0", "speech this loud interrupts (half duplex)"),
    Key("R2D2_CONTEXT_TURNS", "context_turns", 10, _int(0, 200),
        "a whole number between 0 and 200", "turns re-sent to a new session"),
    Key("R2D2_SESSION_MAX_MINUTES", "session_max_minutes", 55.0, _number(0.05, 60.0),
        "a number of minutes between 0.05 and 60", "recycle the connection after this long"),
    Key("R2D2_TRUNCATION_RATIO", "truncation_ratio", 0.8, _number(0.0, 1.0),
        "a number between 0 and 1", "share of context kept when it overflows"),
    Key("R2D2_CONTEXT_TOKEN_LIMIT", "context_token_limit", 16000, _int(0, 1_000_000),
        "a whole number of tokens (0 = the model's limit)", "context that triggers truncation"),
    Key("R2D2_MAX_OUTPUT_TOKENS", "max_output_tokens", None, _off_or_int(1, 4096),
        "'off' or a whole number of tokens between 1 and 4096", "longest reply, in tokens"),
    Key("R2D2_BUDGET_DAILY_USD", "budget_daily_usd", None, _off_or_number(0.01, 1_000_000.0),
        "'off' or an amount in USD (at least 0.01)", "spend per local calendar day"),
    Key("R2D2_BUDGET_MONTHLY_USD", "budget_monthly_usd", None,
        _off_or_number(0.01, 1_000_000.0), "'off' or an amount in USD (at least 0.01)",
        "spend per local calendar month"),
    Key("R2D2_BILL_LOCAL", "bill_local", False, _flag, "on or off",
        "price local-backend sessions as if billed (rehearse a budget offline)"),
    Key("R2D2_METRICS", "metrics", None, _host_port,
        "'off' or HOST:PORT such as 127.0.0.1:9464", "serve Prometheus metrics there"),
    Key("R2D2_RETENTION_DAYS", "retention_days", None, _off_or_number(0.01, 36_500.0),
        "'off' (keep everything) or a number of days, at least 0.01 (about 15 minutes)",
        "delete conversations older than this (shipped first)"),
    Key("R2D2_STORE_TEXT", "store_text", True, _flag, "'true' or 'false'",
        "false: privacy mode, no transcript text, raw events nor tool arguments/output"),
    Key("R2D2_MEMORY", "memory", True, _flag, "on or off",
        "memory across conversations: remember/recall/forget tools, facts in the instructions"),
    Key("R2D2_MEMORY_BUDGET_TOKENS", "memory_budget_tokens", 500, _int(0, 20_000),
        "a whole number of tokens between 0 and 20000",
        "remembered facts put in a session's instructions, at most"),
    *(
        Key(f"R2D2_PRICE_{name.upper()}", f"price_{name}", default, _number(0.0, 10_000.0),
            "a price in USD per million tokens", "price per 1M tokens")
        for name, default in (
            ("audio_in", 32.0), ("audio_in_cached", 0.4), ("text_in", 4.0),
            ("text_in_cached", 0.4), ("audio_out", 64.0), ("text_out", 16.0),
        )
    ),
    Key("R2D2_PRICE_LIVE_MINUTE", "price_live_minute", 0.05, _number(0.0, 1_000.0),
        "a price in USD per minute", "price per minute of a GPT-Live session"),
)
KEYS_BY_ENV = {k.env: k for k in KEYS}
KEYS_BY_ATTR = {k.attr: k for k in KEYS}
_SECRET_ATTRS = tuple(k.attr for k in KEYS if k.secret)


def default(attr: str) -> Any:
    """The default of setting ``attr`` (e.g. ``"echo_tail_ms"``), defined only in KEYS."""
    return KEYS_BY_ATTR[attr].default


@dataclass(frozen=True)
class Settings:
    """Validated configuration. ``repr`` never shows the API key.

    One field per key of KEYS, whose defaults come from there (a test checks both ways).
    """

    api_key: str | None = field(default=default("api_key"), repr=False)
    realtime_url: str = default("realtime_url")
    model: str = default("model")
    voice: str = default("voice")
    instructions: str = default("instructions")
    transcribe_model: str = default("transcribe_model")
    backend: str = default("backend")
    live_url: str = default("live_url")
    live_model: str = default("live_model")
    live_voice: str = default("live_voice")
    live_delegate_model: str = default("live_delegate_model")
    local_protocol: str = default("local_protocol")
    azure_endpoint: str | None = default("azure_endpoint")
    azure_deployment: str | None = default("azure_deployment")
    azure_api_key: str | None = field(default=default("azure_api_key"), repr=False)
    #: R2D2_DB's default is None: the path depends on the environment (see default_db_path)
    db: Path = field(default_factory=lambda: default_db_path({}))
    ship_url: str | None = field(default=default("ship_url"), repr=False)
    #: None: the hostname (resolved and checked where it is used, by the shipper)
    device_id: str | None = default("device_id")
    tools: str | None = default("tools")
    mqtt_url: str | None = field(default=default("mqtt_url"), repr=False)
    mqtt_prefix: str = default("mqtt_prefix")
    mqtt_ca: str | None = default("mqtt_ca")
    listen: str = default("listen")
    wake_word: str = default("wake_word")
    conversation_idle_s: float = default("conversation_idle_s")
    earcons: bool = default("earcons")
    input_device: str | None = default("input_device")
    output_device: str | None = default("output_device")
    output_latency: float = default("output_latency")
    vad_threshold: float = default("vad_threshold")
    vad_silence_ms: int = default("vad_silence_ms")
    vad_prefix_ms: int = default("vad_prefix_ms")
    log_level: str = default("log_level")
    echo: str = default("echo")
    duplex: str = default("duplex")
    noise_reduction: str = default("noise_reduction")
    turn_detection: str = default("turn_detection")
    vad_eagerness: str = default("vad_eagerness")
    echo_tail_ms: int = default("echo_tail_ms")
    barge_in_dbfs: float | None = default("barge_in_dbfs")
    context_turns: int = default("context_turns")
    session_max_minutes: float = default("session_max_minutes")
    truncation_ratio: float = default("truncation_ratio")
    context_token_limit: int = default("context_token_limit")
    max_output_tokens: int | None = default("max_output_tokens")
    budget_daily_usd: float | None = default("budget_daily_usd")
    budget_monthly_usd: float | None = default("budget_monthly_usd")
    bill_local: bool = default("bill_local")
    metrics: str | None = default("metrics")
    retention_days: float | None = default("retention_days")
    store_text: bool = default("store_text")
    memory: bool = default("memory")
    memory_budget_tokens: int = default("memory_budget_tokens")
    price_audio_in: float = default("price_audio_in")
    price_audio_in_cached: float = default("price_audio_in_cached")
    price_text_in: float = default("price_text_in")
    price_text_in_cached: float = default("price_text_in_cached")
    price_audio_out: float = default("price_audio_out")
    price_text_out: float = default("price_text_out")
    price_live_minute: float = default("price_live_minute")
    env_file: Path | None = None
    #: the fleet server R2D2_DB (or ``--db``) named instead of a file: the reports read it,
    #: commands that write the robot's database refuse it (``db`` is then the default path)
    fleet_db: str | None = field(default=None, repr=False)
    #: where each key's value came from ("--flag", "environment", an env file path, "default")
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        hidden = ", ".join(f"{name}={'***' if getattr(self, name) else None!r}"
                           for name in _SECRET_ATTRS)
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr
        )
        return f"Settings({hidden}, {shown})"

    def require_api_key(self) -> str:
        """The key for the OpenAI backend, or a ConfigError (exit 3) saying how to set it."""
        if not self.api_key:
            raise ConfigError(
                "OPENAI_API_KEY is not set: put it in .env (see .env.example), the environment, "
                "or use --backend local"
            )
        return self.api_key

    def where(self, attr: str) -> str:
        """Where setting ``attr`` came from, for a message: "in FILE", "in the environment",
        "on the command line (--flag)" or "by default"."""
        source = self.sources.get(attr, "default")
        if source == "default":
            return "by default"
        if source == "environment":
            return "in the environment"
        if source.startswith("--"):
            return f"on the command line ({source})"
        return f"in {source}"

    def echo_mode(self) -> str:
        """``R2D2_ECHO``; where only the old ``R2D2_DUPLEX`` (or ``--duplex``) was given, its
        meaning: half -> ``half``, full -> ``off``."""
        if self.sources.get("echo", "default") == "default" and self.sources.get(
                "duplex", "default") != "default":
            return "half" if self.duplex == "half" else "off"
        return self.echo

    def secrets(self) -> list[str]:
        """Every value the logs must never show: API keys, the fleet and MQTT URLs and their
        passwords."""
        found = [self.api_key, self.azure_api_key]
        for url in (self.ship_url, self.fleet_db, self.mqtt_url):
            if url:
                password = urlsplit(url).password
                found += [url, password, unquote(password) if password else None]
        return [s for s in found if s]


def default_db_path(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd) > $XDG_DATA_HOME > ~/.local/share, + r2d2voice db name."""
    state = environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "conversations.db"
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "r2d2voice" / "conversations.db"


def find_env_file(explicit: str | os.PathLike[str] | None, cwd: Path | None = None,
                  home: Path | None = None) -> Path | None:
    """``--env-file`` if given, else ./.env, else ~/.r2d2/.env, else None.

    ``--env-file`` names a file that must exist and is not a directory (a bad invocation,
    :class:`UsageError`, otherwise); anything readable will do: ``/dev/null`` is an empty env
    file, ``<(…)`` a pipe."""
    if explicit is not None:
        text = os.fspath(explicit)
        if not text:
            raise UsageError("--env-file '': an empty path; name the env file")
        p = Path(text)
        if p.is_dir():
            raise UsageError(f"--env-file {p}: is a directory, not an env file")
        if not p.exists():
            raise UsageError(f"--env-file {p}: no such file")
        return p
    for candidate in ((cwd or Path.cwd()) / ".env", (home or Path.home()) / ".r2d2" / ".env"):
        if candidate.is_file():
            return candidate
    return None


def _read_env_file(path: Path, *, explicit: bool = False) -> dict[str, str]:
    """The KEY=value lines of ``path`` (read once: a pipe works too). An unreadable file is a
    :class:`ConfigError`, or a :class:`UsageError` when ``--env-file`` named it; bytes that are
    not UTF-8 are a ConfigError naming the line and byte; every line that is no assignment is
    warned about, in order, and ignored."""
    import io

    from dotenv import dotenv_values

    try:
        data = path.read_bytes()
    except OSError as exc:
        error = UsageError if explicit else ConfigError
        raise error(f"cannot read env file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"cannot read env file {path}: line {line}, byte {column} "
                          f"(0x{data[exc.start]:02x}) is not UTF-8 text") from None
    with _dotenv_warnings() as unparsed:
        values = dotenv_values(stream=io.StringIO(text))
    ignored = unparsed + _bare_lines(text, [k for k, v in values.items() if v is None])
    for line, why in sorted(ignored, key=lambda item: item[0] or 0):
        log.warning("%s: %s; the line is ignored", f"{path} line {line}" if line else path, why)
    return {k: v for k, v in values.items() if v is not None}


#: A line python-dotenv ignored: its number (None: not known) and why.
Ignored = tuple[int | None, str]


def _bare_lines(text: str, keys: list[str]) -> list[Ignored]:
    """python-dotenv reads a line without ``=`` (``[section]``, ``FOO``) as a key without a
    value, silently: say why each is ignored."""
    lines = [line.strip().removeprefix("export ").strip() for line in text.splitlines()]
    found: list[Ignored] = []
    for key in keys:
        number = next((i for i, line in enumerate(lines, 1) if line == key), None)
        if key.startswith("[") and key.endswith("]"):
            found.append((number, f"{key} is a section header, and env files have none "
                                  "(KEY=value lines only)"))
        else:
            found.append((number, f"{key} has no value (expected {key}=value)"))
    return found


class _Unparsed(logging.Filter):
    """Collects python-dotenv's parse warnings (they say the line but not the file)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[Ignored] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not parse" in str(record.msg) and record.args:
            line = record.args[0]  # type: ignore[index]
            self.lines.append((int(line) if str(line).isdigit() else None,
                               "cannot parse it (expected KEY=value)"))
        else:
            self.lines.append((None, record.getMessage()))
        return False


@contextmanager
def _dotenv_warnings() -> Iterator[list[Ignored]]:
    dotenv_log = logging.getLogger("dotenv.main")
    collect = _Unparsed()
    dotenv_log.addFilter(collect)
    try:
        yield collect.lines
    finally:
        dotenv_log.removeFilter(collect)


def _warn_unknown(names: Iterable[str], where: str) -> None:
    """A warning for every key that looks like ours but is not (a typo is otherwise silent)."""
    for name in names:
        if name.startswith(OWN_PREFIXES) and name not in KEYS_BY_ENV:
            close = difflib.get_close_matches(name, KEYS_BY_ENV, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            log.warning("unknown setting %s %s is ignored%s", name, where, hint)


_warned_readable: set[Path] = set()


def _warn_if_readable(path: Path, held: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH) and path not in _warned_readable:
        _warned_readable.add(path)
        log.warning("%s holds %s and is readable by other users: chmod 600 %s",
                    path, " and ".join(held), path)


def load_settings(
    *,
    env_file: str | os.PathLike[str] | None = None,
    flags: Mapping[str, tuple[Any, str]] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> Settings:
    """Build Settings: ``flags`` (env key -> (value, "--flag")) > ``environ`` > env file > default.

    Raises ConfigError naming the key and where its bad value came from.
    """
    environ = os.environ if environ is None else environ
    path = find_env_file(env_file, cwd=cwd, home=home)
    file_values = _read_env_file(path, explicit=env_file is not None) if path else {}
    _warn_unknown(sorted(file_values), f"in {path}")
    _warn_unknown(sorted(environ), "in the environment")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        raw: Any = None
        source = "default"
        if flags and flags.get(key.env, (None, ""))[0] is not None:
            raw, source = flags[key.env]
        elif key.env in environ:
            raw, source = environ[key.env], "environment"
        elif key.env in file_values:
            raw, source = file_values[key.env], str(path)
        if raw is None:
            values[key.attr] = key.default
        else:
            try:
                values[key.attr] = key.parse(str(raw))
            except ValueError:
                raise _invalid(key, str(raw), source) from None
        sources[key.attr] = source
    held = [k.env for k in KEYS if k.secret and values[k.attr] and sources[k.attr] == str(path)]
    if held and path is not None:
        _warn_if_readable(path, held)
    db = values.pop("db")
    fleet_db = db if db and is_fleet_url(db) else None
    values["db"] = (Path(db).expanduser() if db and not fleet_db
                    else default_db_path(environ))
    return Settings(**values, env_file=path, fleet_db=fleet_db, sources=sources)


def _invalid(key: Key, raw: str, source: str) -> UsageError | ConfigError:
    """The error for a value of ``key`` that does not parse: a bad invocation (exit 2) when it
    was given on the command line, else a configuration error (exit 3)."""
    if source.startswith("--"):
        where, flag, error = "on the command line", f" ({source})", UsageError
    else:
        where = "in the environment" if source == "environment" else f"in {source}"
        flag, error = "", ConfigError
    return error(f"{key.env}{flag} {where} must be {key.rule}, got {shown_value(key, raw)!r}")


def shown_value(key: Key, raw: str) -> str:
    """``raw`` as a message may show it: a secret key's value is ``***``, but a URL's secret
    is only its password (``postgresql://r2:***@host/db``; a value with none is shown)."""
    if not key.secret:
        return raw
    if key.env != "R2D2_SHIP_URL":
        return "***"
    try:
        parts = urlsplit(raw)
        password = parts.password
    except ValueError:
        return "***"
    if password is None:
        return "***" if "@" in raw else raw  # user:secret@host without a scheme: hide it
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
