"""The shipped systemd units: hardened (exposure <= 2.0) and valid, checked by systemd itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UNITS = ROOT / "systemd"


def analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: .ci/install installs the systemd package")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def with_real_binary(unit: str, tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names a binary that exists here."""
    binary = shutil.which("r2d2voice") or str(ROOT / ".venv" / "bin" / "r2d2voice")
    text = (UNITS / unit).read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={binary}", text, flags=re.M)
    out = tmp_path / unit
    out.write_text(text)
    return out


def test_system_unit_exposure_is_at_most_2() -> None:
    r = analyze("security", "--offline=yes", str(UNITS / "r2d2voice.service"))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= 2.0


def test_system_unit_settings_the_appliance_relies_on() -> None:
    text = (UNITS / "r2d2voice.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "RestartPreventExitStatus=3",
                 "StateDirectory=r2d2voice", "EnvironmentFile=/etc/r2d2voice/r2d2voice.env",
                 "DeviceAllow=char-alsa", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in text, line
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


@pytest.mark.parametrize(("unit", "flags"), [("r2d2voice.service", ()),
                                             ("r2d2voice-user.service", ("--user",))])
def test_units_verify_clean(tmp_path: Path, unit: str, flags: tuple[str, ...]) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    r = analyze("verify", *flags, str(with_real_binary(unit, tmp_path)),
                env={"XDG_RUNTIME_DIR": str(runtime)})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_the_user_unit_runs_what_the_readme_installs_and_shares_the_default_database() -> None:
    readme = (ROOT / "README.md").read_text()
    for unit in ("r2d2voice.service", "r2d2voice-user.service"):
        text = (UNITS / unit).read_text()
        binary = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)  # type: ignore[union-attr]
        venv = binary.rsplit("/bin/", 1)[0]
        assert f"python3 -m venv {venv}" in readme, (unit, binary)
        # `r2d2voice wake` finds the run's control socket in its runtime directory
        assert "RuntimeDirectory=r2d2voice" in text, unit
    # no StateDirectory=: the user service writes ~/.local/share/r2d2voice/conversations.db,
    # where export, sessions, usage and stats look by default
    assert not re.search(r"^StateDirectory=", (UNITS / "r2d2voice-user.service").read_text(),
                         re.M)


@pytest.mark.parametrize("unit", ["r2d2voice.service", "r2d2voice-user.service"])
def test_unit_comments_say_what_run_does(unit: str) -> None:
    """A missing device is waited for, not exit 3; READY does not wait for audio."""
    comments = " ".join(line.lstrip("# ") for line in (UNITS / unit).read_text().splitlines()
                        if line.startswith("#"))
    assert "A missing device is no exit: it is waited for." in comments
    assert "missing device or PortAudio" not in comments
    assert "delivers audio" not in comments and "frames keep arriving" not in comments
