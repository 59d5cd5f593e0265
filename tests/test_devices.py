"""Live audio devices, through a private PulseAudio server with null sinks (see tests/pulse.py).

Device code runs in child processes started with the rig's environment: PortAudio enumerates
ALSA devices once per process, when sounddevice is imported.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from r2d2voice.audio.devices import DeviceInfo, list_devices, resolve_device
from r2d2voice.errors import ConfigError


def _tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    y = amplitude * np.sin(2 * np.pi * freq * t)
    fade = int(0.005 * rate)  # 5 ms ramps: no clicks at the edges
    y[:fade] *= np.linspace(0, 1, fade)
    y[-fade:] *= np.linspace(1, 0, fade)
    return y


def _peak_hz(x: np.ndarray, rate: int) -> float:
    x = x.astype(np.float64) * np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x, n=max(len(x), rate)))  # >= 1 Hz resolution
    return float(np.argmax(spectrum)) * rate / max(len(x), rate)


def _labels(x: np.ndarray, rate: int, window_s: float = 0.02) -> list[str]:
    """Per window: "silence" below -40 dBFS, else the dominant frequency rounded to 10 Hz."""
    n = int(rate * window_s)
    out = []
    for i in range(0, len(x) - n + 1, n):
        w = x[i : i + n].astype(np.float64) / 32768
        if np.sqrt(np.mean(w * w)) < 0.01:
            out.append("silence")
        else:
            out.append(str(round(_peak_hz(x[i : i + n], rate) / 10) * 10))
    return out


def _runs(labels: list[str], min_len: int = 3) -> list[tuple[str, int]]:
    """Collapse labels into (label, length) runs, dropping short transition runs."""
    runs: list[tuple[str, int]] = []
    for label in labels:
        if runs and runs[-1][0] == label:
            runs[-1] = (label, runs[-1][1] + 1)
        else:
            runs.append((label, 1))
    merged: list[tuple[str, int]] = []
    for label, n in runs:
        if n < min_len:
            continue
        if merged and merged[-1][0] == label:
            merged[-1] = (label, merged[-1][1] + n)
        else:
            merged.append((label, n))
    while merged and merged[0][0] == "silence":
        merged.pop(0)
    while merged and merged[-1][0] == "silence":
        merged.pop()
    return merged


# -- device list and resolution (real PortAudio, in a child process) ----------------------------

LIST_SCRIPT = """
import json
from dataclasses import asdict
from r2d2voice.audio.devices import list_devices, format_devices
devs = list_devices()
print(format_devices(devs))
print(json.dumps([asdict(d) for d in devs]))
"""

RESOLVE_SCRIPT = """
import json, sys
from r2d2voice.audio.devices import resolve_device
from r2d2voice.errors import ConfigError
out = []
for kind, spec in json.loads(sys.argv[1]):
    try:
        d = resolve_device(spec, kind)
        out.append({"index": d.index, "name": d.name})
    except ConfigError as exc:
        out.append({"error": str(exc), "exit_code": exc.exit_code})
print(json.dumps(out))
"""


@pytest.mark.pulse
def test_device_list_shows_the_pulse_device(pulse_rig):
    res = pulse_rig.run_python(LIST_SCRIPT)
    assert res.returncode == 0, res.stderr
    *table, data = res.stdout.strip().splitlines()
    devs = [DeviceInfo(**d) for d in json.loads(data)]
    names = {d.name for d in devs}
    assert {"pulse", "default"} <= names
    pulse = next(d for d in devs if d.name == "pulse")
    assert pulse.max_input_channels > 0 and pulse.max_output_channels > 0
    assert sum(d.is_default_input for d in devs) == 1
    table_text = "\n".join(table)
    assert "Input devices:" in table_text and "Output devices:" in table_text
    # The default device is starred in both sections.
    starred = [line for line in table if line.lstrip().startswith("*")]
    assert len(starred) == 2 and all(" default " in line for line in starred)
    assert any(f"{pulse.index}  pulse" in line for line in table)


@pytest.mark.pulse
def test_resolve_device_by_index_name_and_default(pulse_rig):
    listed = pulse_rig.run_python(LIST_SCRIPT)
    devs = {d["name"]: d["index"] for d in json.loads(listed.stdout.strip().splitlines()[-1])}
    queries = [
        ["input", devs["pulse"]],
        ["output", str(devs["pulse"])],
        ["input", "PULSE"],
        ["output", "faul"],
        ["input", None],
        ["input", "usb mic"],
        ["output", 99],
        ["input", "u"],
    ]
    res = pulse_rig.run_json(RESOLVE_SCRIPT, json.dumps(queries))
    assert res[0] == {"index": devs["pulse"], "name": "pulse"}
    assert res[1] == {"index": devs["pulse"], "name": "pulse"}
    assert res[2] == {"index": devs["pulse"], "name": "pulse"}  # case-insensitive
    assert res[3] == {"index": devs["default"], "name": "default"}  # a part of the name
    assert res[4] == {"index": devs["default"], "name": "default"}  # the system default
    missing = res[5]
    assert missing["exit_code"] == 3
    assert missing["error"].startswith("no input device matches 'usb mic'; inputs: ")
    assert f"{devs['pulse']} 'pulse'" in missing["error"]
    assert f"{devs['default']} 'default'" in missing["error"]
    assert "\n" not in missing["error"]
    assert res[6]["error"].startswith("no output device with index 99; outputs: ")
    assert "ambiguous" in res[7]["error"] and res[7]["exit_code"] == 3


@pytest.mark.pulse
def test_devices_command_lists_pulse(pulse_rig):
    res = pulse_rig.run_python(
        "import sys; from r2d2voice.cli.main import main;"
        " sys.argv = ['r2d2voice', 'devices']; main()"
    )
    assert res.returncode == 0, res.stderr
    assert "pulse" in res.stdout and "Output devices:" in res.stdout


# -- resolution rules on a fixed device list (no PortAudio needed) ------------------------------


def _dev(index: int, name: str, inputs: int, outputs: int, *, default: bool = False) -> DeviceInfo:
    return DeviceInfo(index, name, "ALSA", inputs, outputs, 48000.0, default, default)


BOARD = [
    _dev(0, "bcm2835 Headphones: - (hw:0,0)", 0, 2),
    _dev(1, "USB PnP Sound Device: Audio (hw:1,0)", 1, 2),
    _dev(2, "USB Audio", 2, 0),
    _dev(3, "default", 32, 32, default=True),
]


def test_exact_name_beats_substring_and_direction_matters():
    assert resolve_device("usb audio", "input", BOARD).index == 2  # exact, though 1 also contains
    assert resolve_device("pnp", "input", BOARD).index == 1
    assert resolve_device("headphones", "output", BOARD).index == 0
    with pytest.raises(ConfigError) as exc:
        resolve_device("headphones", "input", BOARD)
    assert str(exc.value) == (
        "no input device matches 'headphones'; inputs: 1 'USB PnP Sound Device: Audio (hw:1,0)',"
        " 2 'USB Audio', 3 'default'"
    )
    with pytest.raises(ConfigError, match="has no input channels"):
        resolve_device(0, "input", BOARD)
    with pytest.raises(ConfigError, match=r"ambiguous: matches 1 .*, 2 'USB Audio'"):
        resolve_device("usb", "input", BOARD)


def test_no_default_device_is_a_config_error():
    with pytest.raises(ConfigError, match="no default output device; outputs: none"):
        resolve_device(None, "output", [_dev(0, "mic", 1, 0)])


# -- missing PortAudio ------------------------------------------------------------------------


def test_missing_portaudio_library_is_a_config_error(monkeypatch):
    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    with pytest.raises(ConfigError) as exc:
        list_devices()
    assert exc.value.exit_code == 3
    assert str(exc.value) == (
        "PortAudio library not found: install it with `apt install libportaudio2`"
    )


def test_devices_command_without_portaudio_exits_3():
    # The real sounddevice import, with the library lookup failing as on a board without it.
    script = (
        "import ctypes.util, sys\n"
        "ctypes.util.find_library = lambda name: None\n"
        "from r2d2voice.cli.main import main\n"
        "sys.argv = ['r2d2voice', 'devices']\n"
        "main()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip().splitlines() == [
        "r2d2voice: error: PortAudio library not found: install it with `apt install libportaudio2`"
    ]


def test_importing_devices_does_not_load_portaudio():
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, r2d2voice.audio.devices; print('sounddevice' in sys.modules)",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# -- capture ----------------------------------------------------------------------------------

CAPTURE_SCRIPT = """
import json, sys
from functools import partial
import numpy as np
import trio
from r2d2voice.audio.devices import CaptureStatistics, resolve_device, run_capture

spec, tone, out = sys.argv[1], sys.argv[3], sys.argv[4]
rate = None if sys.argv[2] == "default" else int(sys.argv[2])

async def main():
    device = resolve_device(spec, "input")
    stats = CaptureStatistics()
    send, receive = trio.open_memory_channel(500)
    frames = []
    ended = False

    async def collect():
        nonlocal ended
        async with receive:
            async for frame in receive:
                frames.append(frame)
        ended = True  # run_capture closed the channel: end of stream flowed downstream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        scope = trio.CancelScope()

        async def capture(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await run_capture(send, device, samplerate=rate, stats=stats,
                                  task_status=task_status)

        await nursery.start(capture)
        await trio.sleep(0.3)
        await trio.run_process(["paplay", "--device=mic", tone])
        await trio.sleep(0.5)
        scope.cancel()

    pcm = np.frombuffer(b"".join(frames), dtype="<i2")
    np.save(out, pcm)
    print(json.dumps({
        "ended": ended, "frames": len(frames), "sizes": sorted({len(f) for f in frames}),
        "sent": stats.frames_sent, "dropped": stats.frames_dropped,
        "samplerate": stats.samplerate, "last_frame_time": stats.last_frame_time,
    }))

trio.run(main)
"""


# The ALSA "pulse" device's default rate is 44100 Hz: "default" opens it at that rate.
RATES = [pytest.param("48000", 48000, id="48000"), pytest.param("default", 44100, id="44100")]


@pytest.mark.pulse
@pytest.mark.parametrize(("rate", "expected_rate"), RATES)
def test_capture_delivers_24khz_frames_of_what_the_mic_heard(
    pulse_rig, tmp_path, rate, expected_rate
):
    tone = tmp_path / "tone.wav"
    soundfile.write(tone, _tone(440, 1.0, 48000), 48000, subtype="PCM_16")
    out = tmp_path / "captured.npy"
    info = pulse_rig.run_json(CAPTURE_SCRIPT, "pulse", rate, str(tone), str(out))

    assert info["ended"] is True
    assert info["samplerate"] == expected_rate
    assert info["sizes"] == [960]
    assert info["sent"] == info["frames"] and info["dropped"] == 0
    assert info["last_frame_time"] is not None
    pcm = np.load(out)
    labels = _labels(pcm, 24000)
    assert _runs(labels) == [("440", pytest.approx(50, abs=3))]  # 1.0 s of 440 Hz, 20 ms windows
    active = np.flatnonzero(np.array(labels) != "silence")
    assert _peak_hz(pcm[active[0] * 480 : (active[-1] + 1) * 480], 24000) == pytest.approx(
        440, abs=2
    )


DROP_SCRIPT = """
import json, logging
import trio
from r2d2voice.audio.devices import CaptureStatistics, resolve_device, run_capture

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

async def main():
    device = resolve_device("pulse", "input")
    stats = CaptureStatistics()
    send, receive = trio.open_memory_channel(5)  # nobody reads: the uplink is stuck
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_capture(
            send, device, stats=stats, task_status=task_status))
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    frames = []
    async with receive:
        async for frame in receive:
            frames.append(frame)
    print(json.dumps({"sent": stats.frames_sent, "dropped": stats.frames_dropped,
                      "received": len(frames)}))

trio.run(main)
"""


@pytest.mark.pulse
def test_a_full_uplink_drops_new_frames_counts_and_warns_once_a_second(pulse_rig):
    res = pulse_rig.run_python(DROP_SCRIPT)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["sent"] == info["received"] == 5  # the oldest frames stay; capture never waited
    assert info["dropped"] >= 40  # ~1.5 s of 20 ms frames, minus start-up
    warnings = [line for line in res.stderr.splitlines() if "frames dropped" in line]
    assert 1 <= len(warnings) <= 2, warnings  # rate-limited: at most one a second


# -- playback ---------------------------------------------------------------------------------

PLAYBACK_SCRIPT = """
import json, sys
import numpy as np
import trio
from r2d2voice.audio.devices import PlaybackStatistics, resolve_device, run_playback
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

spec = sys.argv[1]
rate = None if sys.argv[2] == "default" else int(sys.argv[2])

def tone(freq, seconds):
    t = np.arange(int(seconds * 24000)) / 24000
    y = 0.5 * np.sin(2 * np.pi * freq * t)
    y[:120] *= np.linspace(0, 1, 120)
    y[-120:] *= np.linspace(1, 0, 120)
    return np.round(y * 32767).astype(np.int16)

async def main():
    device = resolve_device(spec, "output")
    buffer = PlayoutBuffer()
    stats = PlaybackStatistics()
    send, receive = trio.open_memory_channel(8)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_playback(
            receive, buffer, device, samplerate=rate, stats=stats, task_status=task_status))
        async with send:
            await send.send(AudioChunk("a", tone(440, 0.3)))
            await trio.sleep(0.6)   # reply "a" runs dry mid-way: an underrun
            await send.send(AudioChunk("a", tone(440, 0.3)))
            await trio.sleep(0.6)   # a pause between replies is not an underrun
            await send.send(AudioChunk("b", tone(660, 0.4)))
        # run_playback drains the buffer and returns on its own
    s = buffer.statistics()
    print(json.dumps({
        "played_a": buffer.played_samples("a"), "played_b": buffer.played_samples("b"),
        "underruns": stats.underruns, "buffer_underruns": s.underruns, "queued": s.queued_samples,
        "samplerate": stats.samplerate, "callbacks": stats.callbacks,
        "callback_errors": stats.callback_errors,
    }))

trio.run(main)
"""


@pytest.mark.pulse
@pytest.mark.parametrize(("rate", "expected_rate"), RATES)
def test_playback_plays_replies_and_counts_what_was_played(
    pulse_rig, tmp_path, rate, expected_rate
):
    wav = tmp_path / "speaker.wav"
    with pulse_rig.record(wav, rate=48000):
        info = pulse_rig.run_json(PLAYBACK_SCRIPT, "pulse", rate)

    assert info["samplerate"] == expected_rate
    assert info["played_a"] == 2 * 7200  # every pushed sample was handed to the device
    assert info["played_b"] == 9600
    assert info["queued"] == 0
    assert info["underruns"] == 1 and info["buffer_underruns"] == 1
    assert info["callbacks"] > 0 and info["callback_errors"] == 0

    recorded, sr = soundfile.read(wav, dtype="int16")
    assert sr == 48000
    runs = _runs(_labels(recorded, sr))
    # What the speaker played: 0.3 s of 440 Hz, silence, 0.3 s more, silence, 0.4 s of 660 Hz.
    assert [label for label, _ in runs] == ["440", "silence", "440", "silence", "660"]
    assert runs[0][1] == pytest.approx(15, abs=2)
    assert runs[2][1] == pytest.approx(15, abs=2)
    assert runs[4][1] == pytest.approx(20, abs=2)
