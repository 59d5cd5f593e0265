"""Defaults are defined once, in ``system.config.KEYS``: the Settings object, ``.env.example``,
the systemd env example and the README's table all agree with it."""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
from dotenv import dotenv_values

from r2d2voice.system.config import KEYS, KEYS_BY_ENV, Settings, default, load_settings

ROOT = Path(__file__).resolve().parents[1]
#: Keys whose default is not a value a file could show: a secret, a path that depends on where
#: the service runs, a device that defaults to the system's own.
NO_SHOWN_DEFAULT = {"OPENAI_API_KEY", "R2D2_DB", "R2D2_INPUT_DEVICE", "R2D2_OUTPUT_DEVICE",
                    "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_DEPLOYMENT", "AZURE_OPENAI_API_KEY",
                    "R2D2_TOOLS", "R2D2_SHIP_URL", "R2D2_DEVICE_ID", "R2D2_MQTT_URL",
                    "R2D2_MQTT_CA"}
NOT_KEYS = {"env_file", "fleet_db", "sources"}


def _parsed(env: str, raw: str) -> object:
    """What the application makes of ``raw`` for key ``env`` (as load_settings would)."""
    return KEYS_BY_ENV[env].parse(raw)


def test_every_key_is_defined_once() -> None:
    assert len(KEYS_BY_ENV) == len(KEYS), "a key is defined twice in KEYS"
    assert len({k.attr for k in KEYS}) == len(KEYS), "two keys share a Settings attribute"


def test_settings_fields_are_exactly_the_keys_with_their_defaults() -> None:
    by_attr = {f.name: f for f in fields(Settings) if f.name not in NOT_KEYS}
    assert set(by_attr) == {k.attr for k in KEYS}
    for key in KEYS:
        f = by_attr[key.attr]
        if key.env == "R2D2_DB":  # None in KEYS: computed from the environment
            assert key.default is None and f.default is MISSING
            continue
        assert f.default == key.default == default(key.attr), key.env


def test_loading_nothing_gives_the_key_defaults(tmp_path: Path) -> None:
    s = load_settings(environ={}, cwd=tmp_path, home=tmp_path)
    for key in KEYS:
        if key.env != "R2D2_DB":
            assert getattr(s, key.attr) == key.default, key.env
        assert s.sources[key.attr] == "default"
    assert s == Settings(db=s.db)


def test_env_example_lists_every_key_with_its_default() -> None:
    example = dotenv_values(ROOT / ".env.example")
    unknown = set(example) - set(KEYS_BY_ENV)
    assert not unknown, f".env.example has keys the code does not know: {sorted(unknown)}"
    missing = [k.env for k in KEYS if k.env not in example]
    assert not missing, f"keys missing from .env.example: {missing}"
    for env, raw in example.items():
        if env in NO_SHOWN_DEFAULT:
            assert not raw, f"{env} in .env.example should be empty (no default to show)"
            continue
        assert raw, f"{env} in .env.example has no value"
        assert _parsed(env, raw) == KEYS_BY_ENV[env].default, env


def test_systemd_env_example_names_only_real_keys() -> None:
    text = (ROOT / "systemd" / "r2d2voice.env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M)
    assert names, "no keys found in systemd/r2d2voice.env.example"
    unknown = sorted(set(names) - set(KEYS_BY_ENV))
    assert not unknown, unknown


def _readme_defaults() -> dict[str, str]:
    """``KEY -> default`` from the README's configuration table, where the default cell is one
    literal value in backticks (not prose such as "system default")."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`|]*)` \|", (ROOT / "README.md").read_text(),
                      re.M)
    return dict(rows)


def test_readme_table_shows_the_code_defaults() -> None:
    shown = _readme_defaults()
    assert {"REALTIME_MODEL", "R2D2_VAD_THRESHOLD", "R2D2_VAD_SILENCE_MS"} <= set(shown)
    for env, raw in shown.items():
        assert env in KEYS_BY_ENV, f"README documents an unknown key {env}"
        assert _parsed(env, raw) == KEYS_BY_ENV[env].default, env


def test_readme_documents_every_key() -> None:
    text = (ROOT / "README.md").read_text()
    undocumented = [k.env for k in KEYS if not k.env.startswith("R2D2_PRICE_")
                    and not re.search(rf"`{k.env}\b", text)]
    assert not undocumented, f"keys the README does not mention: {undocumented}"
    assert "`R2D2_PRICE_*`" in text


@pytest.mark.parametrize("key", [k for k in KEYS if k.default is not None], ids=lambda k: k.env)
def test_every_default_passes_its_own_validation(key) -> None:
    shown = key.default if not isinstance(key.default, float) else repr(key.default)
    assert key.parse(str(shown)) == key.default


#: Defaults that other rooms still repeat as literals (the sans-IO core cannot import settings):
#: (module, object, parameter, KEYS attr, settings -> there). Classes that read ``default()``
#: (VadParams, LinkPolicy, Prices) repeat nothing and need no check.
REPEATED: list[tuple[str, str, str, str, object]] = [
    ("r2d2voice.realtime.client_events", "SessionConfig", "voice", "voice", None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "transcribe_model",
     "transcribe_model", None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "vad_threshold", "vad_threshold", None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "vad_prefix_ms", "vad_prefix_ms", None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "vad_silence_ms", "vad_silence_ms",
     None),
    ("r2d2voice.live.client_events", "LiveConfig", "model", "live_model", None),
    ("r2d2voice.live.client_events", "LiveConfig", "voice", "live_voice", None),
    ("r2d2voice.live.client_events", "LiveConfig", "delegate_model", "live_delegate_model",
     None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "turn_detection", "turn_detection",
     None),
    ("r2d2voice.realtime.client_events", "SessionConfig", "eagerness", "vad_eagerness", None),
]


def _declared_default(obj: object, name: str) -> object:
    """The default ``obj`` (a dataclass or a callable) declares for ``name``, or MISSING."""
    if is_dataclass(obj):
        f = {f.name: f for f in fields(obj)}[name]
        return f.default
    default_ = inspect.signature(obj).parameters[name].default  # type: ignore[arg-type]
    return MISSING if default_ is inspect.Parameter.empty else default_


@pytest.mark.parametrize(("module", "obj", "name", "attr", "convert"), REPEATED,
                         ids=[f"{r[1]}.{r[2]}" for r in REPEATED])
def test_a_default_repeated_elsewhere_agrees_with_keys(module, obj, name, attr, convert) -> None:
    declared = _declared_default(getattr(importlib.import_module(module), obj), name)
    assert declared is not MISSING, f"{obj}.{name} no longer repeats a default: drop it here"
    expected = default(attr) if convert is None else convert(default(attr))
    wanted = pytest.approx(expected) if isinstance(expected, float) else expected
    assert declared == wanted, f"{module}.{obj}.{name} = {declared!r}, KEYS says {expected!r}"


def test_the_wire_rate_is_one_number() -> None:
    rates = {m: importlib.import_module(m).RATE
             for m in ("r2d2voice.audio.pcm", "r2d2voice.realtime.client_events",
                       "r2d2voice.live.client_events", "r2d2voice.localbackend.wire")}
    assert set(rates.values()) == {24000}, rates
