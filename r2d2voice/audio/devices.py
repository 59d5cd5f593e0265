"""Sound devices: listing them and finding the one a setting names.

Capture and playback live in :mod:`r2d2voice.audio.capture` and
:mod:`r2d2voice.audio.playback`; PortAudio plumbing in :mod:`r2d2voice.audio.portaudio`;
waiting for a device that is missing in :mod:`r2d2voice.audio.availability`.
"""

from __future__ import annotations

from dataclasses import dataclass

from r2d2voice.audio.portaudio import DeviceUnavailable, Kind, pa_lock, sounddevice
from r2d2voice.errors import ConfigError

__all__ = [
    "DeviceInfo",
    "DeviceUnavailable",
    "Kind",
    "devices_command",
    "format_devices",
    "list_devices",
    "resolve_device",
]


#: What to check when PortAudio sees no device at all.
NO_DEVICES_HINT = "is the sound server running, and is this user in the 'audio' group?"


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device, as listed at the last scan."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    is_default_input: bool
    is_default_output: bool

    def channels(self, kind: Kind) -> int:
        return self.max_input_channels if kind == "input" else self.max_output_channels

    def describe(self) -> str:
        return f"{self.index} {self.name!r}"


def _default_index(sd: object, kind: Kind) -> int | None:
    try:
        return int(sd.query_devices(kind=kind)["index"])  # type: ignore[attr-defined]
    except Exception:  # PortAudioError: no default device of that kind
        return None


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio sees (as of its last scan), with the default flags."""
    sd = sounddevice()
    with pa_lock():
        try:
            hostapis = [h["name"] for h in sd.query_hostapis()]
            listed = sd.query_devices()
        except sd.PortAudioError as exc:  # not initialised: a rescan failed
            raise DeviceUnavailable(f"PortAudio lists no devices: {exc}") from exc
        default_in = _default_index(sd, "input")
        default_out = _default_index(sd, "output")
    devices = []
    for d in listed:
        hostapi = d["hostapi"]
        devices.append(
            DeviceInfo(
                index=int(d["index"]),
                name=str(d["name"]),
                hostapi=hostapis[hostapi] if 0 <= hostapi < len(hostapis) else str(hostapi),
                max_input_channels=int(d["max_input_channels"]),
                max_output_channels=int(d["max_output_channels"]),
                default_samplerate=float(d["default_samplerate"]),
                is_default_input=d["index"] == default_in,
                is_default_output=d["index"] == default_out,
            )
        )
    return devices


def format_devices(devs: list[DeviceInfo]) -> str:
    """A table of input and output devices; ``*`` marks the defaults."""
    lines = []
    sections: tuple[tuple[Kind, str], ...] = (("input", "Input"), ("output", "Output"))
    for kind, title in sections:
        lines.append(f"{title} devices:")
        rows = [d for d in devs if d.channels(kind) > 0]
        if not rows:
            lines.append("  (none)")
        width = max((len(d.name) for d in rows), default=0)
        for d in rows:
            default = d.is_default_input if kind == "input" else d.is_default_output
            lines.append(
                f"  {'*' if default else ' '} {d.index:>3}  {d.name:<{width}}  "
                f"{d.channels(kind):>3} ch  {d.default_samplerate:>6.0f} Hz  {d.hostapi}"
            )
    lines.append("(* = default; choose with an index or a part of the name)")
    if not devs:
        lines.append(f"no sound devices: {NO_DEVICES_HINT}")
    return "\n".join(lines)


def devices_command() -> None:
    """The ``devices`` command: the table of inputs and outputs on stdout."""
    print(format_devices(list_devices()))


def inventory(devs: list[DeviceInfo], kind: Kind) -> str:
    """``inputs: 0 'pulse', 1 'default'`` (with what to check when there are no devices)."""
    rows = [d.describe() for d in devs if d.channels(kind) > 0]
    if not devs:
        return f"{kind}s: none ({NO_DEVICES_HINT})"
    return f"{kind}s: {', '.join(rows) if rows else 'none'}"


def resolve_device(
    spec: str | int | None, kind: Kind, devices: list[DeviceInfo] | None = None
) -> DeviceInfo:
    """Find the device ``spec`` names, for ``kind`` ("input" or "output").

    ``None`` (or "") is the system default; an int or a string of digits is an index; any other
    string is a case-insensitive part of the name (names survive reboots, USB card numbers do
    not). An exact name wins over substrings.

    Several substring matches are ambiguous: :class:`ConfigError` (exit 3; waiting cannot fix
    it). A device that is not there (no match, no default, an index that is missing or has no
    ``kind`` channels) is :class:`DeviceUnavailable`: it may appear later. Both messages are one
    line listing the devices there are.
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
    devs = list_devices() if devices is None else devices
    usable = [d for d in devs if d.channels(kind) > 0]
    listed = inventory(devs, kind)

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        for d in usable:
            if d.is_default_input if kind == "input" else d.is_default_output:
                return d
        raise DeviceUnavailable(f"no default {kind} device; {listed}")

    if isinstance(spec, int) or spec.strip().isdigit():
        index = int(spec)
        found = next((d for d in devs if d.index == index), None)
        if found is None:
            raise DeviceUnavailable(f"no {kind} device with index {index}; {listed}")
        if found.channels(kind) <= 0:
            raise DeviceUnavailable(
                f"device {found.describe()} has no {kind} channels; {listed}")
        return found

    needle = spec.strip().casefold()
    exact = [d for d in usable if d.name.casefold() == needle]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [d for d in usable if needle in d.name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(d.describe() for d in matches)
        raise ConfigError(f"{kind} device {spec!r} is ambiguous: matches {names}; use an index")
    raise DeviceUnavailable(f"no {kind} device matches {spec!r}; {listed}")
