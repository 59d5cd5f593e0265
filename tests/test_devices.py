"""Live audio devices, through a private PulseAudio server with null sinks (see tests/pulse.py).

Device code runs in child processes started with the rig's environment: PortAudio enumerates
ALSA devices once per process, when sounddevice is imported.
"""

from __future__ import annotations

import builtins
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile
import trio
from support import SCRUBBED_PREFIXES, tone

from r2d2voice.audio.capture import CaptureStatistics, _Capture
from r2d2voice.audio.devices import (
    DeviceInfo,
    DeviceUnavailable,
    format_devices,
    list_devices,
    resolve_device,
)
from r2d2voice.audio.playback import PlaybackStatistics, _Output
from r2d2voice.audio.playout import PlayoutBuffer
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
from r2d2voice.errors import R2Error
out = []
for kind, spec in json.loads(sys.argv[1]):
    try:
        d = resolve_device(spec, kind)
        out.append({"index": d.index, "name": d.name})
    except R2Error as exc:
        out.append({"error": str(exc), "exit_code": exc.exit_code})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def listing(pulse_rig) -> tuple[list[str], list[DeviceInfo]]:
    """``format_devices`` lines and the DeviceInfo list, from a child on the rig."""
    res = pulse_rig.run_python(LIST_SCRIPT)
    assert res.returncode == 0, res.stderr
    *table, data = res.stdout.strip().splitlines()
    return table, [DeviceInfo(**d) for d in json.loads(data)]


@pytest.mark.pulse
def test_device_list_shows_the_pulse_device(listing):
    table, devs = listing
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
def test_resolve_device_by_index_name_and_default(pulse_rig, listing):
    devs = {d.name: d.index for d in listing[1]}
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
    assert missing["exit_code"] == 1  # DeviceUnavailable: `run` waits for it
    assert missing["error"].startswith("no input device matches 'usb mic'; inputs: ")
    assert f"{devs['pulse']} 'pulse'" in missing["error"]
    assert f"{devs['default']} 'default'" in missing["error"]
    assert "\n" not in missing["error"]
    assert res[6]["error"].startswith("no output device with index 99; outputs: ")
    assert "ambiguous" in res[7]["error"] and res[7]["exit_code"] == 3  # waiting cannot help


@pytest.mark.pulse
def test_devices_command_prints_the_device_table(pulse_rig, listing, tmp_path):
    env = {k: v for k, v in pulse_rig.env.items() if not k.startswith(SCRUBBED_PREFIXES)}
    res = subprocess.run([sys.executable, "-m", "r2d2voice", "devices"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == listing[0]


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
    with pytest.raises(DeviceUnavailable) as exc:
        resolve_device("headphones", "input", BOARD)
    assert str(exc.value) == (
        "no input device matches 'headphones'; inputs: 1 'USB PnP Sound Device: Audio (hw:1,0)',"
        " 2 'USB Audio', 3 'default'"
    )
    with pytest.raises(DeviceUnavailable, match="has no input channels"):
        resolve_device(0, "input", BOARD)
    with pytest.raises(ConfigError, match=r"ambiguous: matches 1 .*, 2 'USB Audio'"):
        resolve_device("usb", "input", BOARD)


def test_no_default_device_is_a_device_to_wait_for():
    with pytest.raises(DeviceUnavailable, match=r"no default output device; outputs: none$"):
        resolve_device(None, "output", [_dev(0, "mic", 1, 0)])


def test_no_devices_at_all_says_what_to_check():
    hint = "is the sound server running, and is this user in the 'audio' group?"
    with pytest.raises(DeviceUnavailable) as exc:
        resolve_device("QuadCast", "input", [])
    assert str(exc.value) == f"no input device matches 'QuadCast'; inputs: none ({hint})"
    assert format_devices([]).splitlines()[-1] == f"no sound devices: {hint}"


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
import numpy as np
import trio
import r2d2voice.audio.capture
from r2d2voice.audio.capture import CaptureStatistics, run_capture
from r2d2voice.audio.devices import resolve_device

# A shorter stall than the appliance's 3 s, still well over the 0.6 s suspension below (which
# must not count as a stall): the same reopening, sooner.
r2d2voice.audio.capture.STALL_SECONDS = 1.5

tone, out = sys.argv[1], sys.argv[2]
RATES = {"48000": 48000, "default": None}

async def pactl(*args):
    await trio.run_process(["pactl", *args])

async def main():
    device = resolve_device("pulse", "input")
    captures = {}
    scopes = []

    async def capture(name, rate, task_status=trio.TASK_STATUS_IGNORED):
        stats = CaptureStatistics()
        send, receive = trio.open_memory_channel(500)
        got = captures[name] = {"stats": stats, "frames": [], "times": [], "ended": False}
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()
            scopes.append(scope)

            async def record(task_status):
                with scope:
                    await run_capture(send, device, samplerate=rate, stats=stats,
                                      task_status=task_status)

            await nursery.start(record)
            task_status.started()
            async with receive:
                async for frame in receive:
                    got["frames"].append(frame)
                    got["times"].append(trio.current_time())
            got["ended"] = True  # run_capture closed the channel: end of stream flowed down

    async with trio.open_nursery() as nursery:
        for name, rate in RATES.items():
            await nursery.start(capture, name, rate)
        await trio.sleep(0.2)
        await trio.run_process(["paplay", "--device=mic", tone])
        await trio.sleep(0.2)
        # A microphone that delivers nothing: the suspended sink's monitor goes quiet.
        await pactl("suspend-sink", "mic", "1")
        suspended = trio.current_time()
        await trio.sleep(0.6)
        resumed = trio.current_time()
        await pactl("suspend-sink", "mic", "0")
        await trio.sleep(0.4)
        # A microphone silent for longer than STALL_SECONDS: the stream is opened again.
        await pactl("suspend-sink", "mic", "1")
        with trio.move_on_after(10):  # (a capture that never reopens fails the tests)
            while not all(got["stats"].reopens for got in captures.values()):
                await trio.sleep(0.05)
        await pactl("suspend-sink", "mic", "0")
        stalled = trio.current_time()
        await trio.sleep(0.5)
        for scope in scopes:
            scope.cancel()

    report = {}
    for name, got in captures.items():
        stats, times = got["stats"], np.array(got["times"])
        np.save(f"{out}-{name}.npy", np.frombuffer(b"".join(got["frames"]), dtype="<i2"))
        report[name] = {
            "ended": got["ended"], "frames": len(got["frames"]),
            "sizes": sorted({len(f) for f in got["frames"]}),
            "sent": stats.frames_sent, "dropped": stats.frames_dropped,
            "samplerate": stats.samplerate,
            "last_frame_time": stats.last_frame_time,
            "during_suspension": int(np.sum((times > suspended + 0.15) & (times < resumed))),
            "after_resume": int(np.sum((times > resumed) & (times < resumed + 0.4))),
            "reopens": stats.reopens,
            "after_stall": int(np.sum(times > stalled)),
        }
    print(json.dumps(report))

trio.run(main)
"""


@pytest.fixture(scope="module")
def captured(pulse_rig, tmp_path_factory) -> tuple[dict, Path]:
    """0.5 s of 440 Hz played into the mic while ``pulse`` is captured at 48 kHz and at its
    default rate at once; then the mic is suspended for 0.6 s and resumed, then suspended for
    longer than STALL_SECONDS and resumed."""
    tmp = tmp_path_factory.mktemp("capture")
    tone = tmp / "tone.wav"
    soundfile.write(tone, _tone(440, 0.5, 48000), 48000, subtype="PCM_16")
    return pulse_rig.run_json(CAPTURE_SCRIPT, str(tone), str(tmp / "captured")), tmp


# The ALSA "pulse" device's default rate is 44100 Hz: "default" opens it at that rate.
RATES = [pytest.param("48000", 48000, id="48000"), pytest.param("default", 44100, id="44100")]


@pytest.mark.pulse
@pytest.mark.parametrize(("rate", "expected_rate"), RATES)
def test_capture_delivers_24khz_frames_of_what_the_mic_heard(captured, rate, expected_rate):
    report, tmp = captured
    info = report[rate]
    assert info["ended"] is True
    assert info["samplerate"] == expected_rate
    assert info["sizes"] == [960]
    assert info["sent"] == info["frames"] and info["dropped"] == 0
    assert info["last_frame_time"] is not None
    pcm = np.load(tmp / f"captured-{rate}.npy")
    labels = _labels(pcm, 24000)
    assert _runs(labels) == [("440", pytest.approx(25, abs=3))]  # 0.5 s of 440 Hz
    active = np.flatnonzero(np.array(labels) != "silence")
    assert _peak_hz(pcm[active[0] * 480 : (active[-1] + 1) * 480], 24000) == pytest.approx(
        440, abs=2
    )


@pytest.mark.pulse
@pytest.mark.parametrize("rate", ["48000", "default"])
def test_a_suspended_microphone_delivers_no_frames_and_capture_resumes(captured, rate):
    # What the watchdog relies on (see test_notify): no frames while the source is suspended,
    # and capture neither fails nor ends; frames flow again once it is back.
    info = captured[0][rate]
    assert info["during_suspension"] == 0, info
    assert info["after_resume"] >= 5, info


@pytest.mark.pulse
@pytest.mark.parametrize("rate", ["48000", "default"])
def test_a_microphone_silent_for_seconds_is_opened_again_and_delivers(captured, rate):
    info = captured[0][rate]
    assert info["reopens"] >= 1, info
    assert info["after_stall"] >= 5, info  # frames flow again, in the same channel
    assert info["ended"] is True


def _capture(send: trio.MemorySendChannel[bytes], stats: CaptureStatistics) -> _Capture:
    capture = _Capture(send, stats, trio.lowlevel.current_trio_token())
    capture.configure(48000, 2)
    return capture


def _deliver(capture: _Capture, block: np.ndarray) -> None:
    """What PortAudio's thread and then the trio thread do with one block."""
    capture.push(block, False)
    capture.drain()


def _blocks(seconds: float) -> list[np.ndarray]:
    """20 ms blocks of a 48 kHz stereo sweep, as PortAudio's callback would hand them over."""
    t = np.arange(int(seconds * 48000)) / 48000
    x = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)
    return list(np.stack([x, x], axis=1).reshape(-1, 960, 2))


async def test_a_full_uplink_drops_new_frames_counts_and_warns_once_a_second(
    autojump_clock, caplog
):
    blocks = _blocks(2.5)
    # What the frames are when nothing is dropped.
    send_all, receive_all = trio.open_memory_channel[bytes](1000)
    reference = _capture(send_all, CaptureStatistics())
    for block in blocks:
        _deliver(reference, block)
    expected = [receive_all.receive_nowait() for _ in range(5)]

    stats = CaptureStatistics()
    send, receive = trio.open_memory_channel[bytes](5)  # nobody reads: the uplink is stuck
    capture = _capture(send, stats)
    with caplog.at_level(logging.WARNING, logger="r2d2voice.audio.capture"):
        for block in blocks:
            _deliver(capture, block)
            await trio.sleep(0.02)
    warnings = [r.getMessage() for r in caplog.records if "frames dropped" in r.getMessage()]
    assert stats.frames_sent == 5 and stats.frames_dropped > 100
    assert stats.frames_sent + stats.frames_dropped == reference.stats.frames_sent
    # the oldest frames stay; capture never waited
    assert [receive.receive_nowait() for _ in range(5)] == expected
    assert len(warnings) == 3  # rate-limited over 2.5 s: at most one a second
    counts = [int(w.split()[1]) for w in warnings]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] <= stats.frames_dropped


async def test_capture_stops_delivering_once_the_receiver_is_gone() -> None:
    send, receive = trio.open_memory_channel[bytes](5)
    stats = CaptureStatistics()
    capture = _capture(send, stats)
    await receive.aclose()
    for block in _blocks(0.2):
        _deliver(capture, block)
    assert capture.receiver_gone.is_set()
    assert stats.frames_sent == 0 and stats.frames_dropped == 0


async def test_quiet_audio_goes_to_trio_in_100ms_batches_and_block_by_block_when_urgent():
    send, receive = trio.open_memory_channel[bytes](1000)
    capture = _capture(send, CaptureStatistics())
    drains: list[int] = []
    capture.on_block = lambda: drains.append(capture.read)
    blocks = iter(_blocks(1.0))  # 20 ms blocks at 48 kHz

    async def push(n: int) -> None:
        for _ in range(n):
            capture.push(next(blocks), False)  # as PortAudio's thread does
            await trio.testing.wait_all_tasks_blocked()  # trio runs what was handed over

    await push(4)
    assert drains == []  # 80 ms: nobody woken yet
    await push(1)
    assert drains == [5 * 960]  # one wake-up for the 100 ms batch
    await push(7)
    assert drains == [5 * 960, 10 * 960]
    capture.set_urgent(True)  # a turn opens: what waits goes at once ...
    assert drains[-1] == 12 * 960
    await push(3)  # ... and each block from now on
    assert drains[-3:] == [13 * 960, 14 * 960, 15 * 960]
    assert receive.statistics().current_buffer_used > 0


async def test_a_ring_trio_did_not_drain_for_a_second_loses_the_newest_blocks():
    send, receive = trio.open_memory_channel[bytes](1000)
    stats = CaptureStatistics()
    capture = _capture(send, stats)
    blocks = _blocks(1.2)
    for block in blocks:  # 1.2 s arrive while trio is busy elsewhere
        capture.push(block, False)
    assert stats.overflows == 10  # the ring holds 1 s: 10 blocks of 20 ms are lost
    capture.drain()
    reference_send, reference = trio.open_memory_channel[bytes](1000)
    expected = _capture(reference_send, CaptureStatistics())
    for block in blocks[:50]:
        _deliver(expected, block)
    # what was kept is the first second, intact
    got = [receive.receive_nowait() for _ in range(receive.statistics().current_buffer_used)]
    want = [reference.receive_nowait() for _ in range(reference.statistics().current_buffer_used)]
    assert got == want and len(got) >= 45


def _callbacks(output: _Output, n: int, frames: int = 480) -> np.ndarray:
    """``n`` PortAudio output callbacks of ``frames`` stereo samples; the left channel."""
    status = types.SimpleNamespace(output_underflow=False)
    played = []
    for _ in range(n):
        block = np.full((frames, 2), 7, dtype=np.int16)  # garbage: the callback must overwrite
        output.callback(block, frames, None, status)
        played.append(block[:, 0].copy())
    return np.concatenate(played)


def test_the_speaker_plays_a_reply_to_its_end_then_idles_without_resampling():
    buffer, stats = PlayoutBuffer(), PlaybackStatistics()
    output = _Output(buffer, stats)
    output.configure(48000)
    reply = tone(0.3, dbfs=-20.0)
    buffer.push("a", reply)
    out = _callbacks(output, 60)  # 0.6 s at 48 kHz
    assert buffer.played_samples("a") == len(reply) and output.silent
    # all of the reply came out (twice the samples at twice the rate), none of its tail stuck
    energy = float(np.sum(out.astype(np.float64) ** 2)) / 2
    assert energy == pytest.approx(float(np.sum(reply.astype(np.float64) ** 2)), rel=0.02)
    assert not np.any(out[-4800:])  # then silence

    resampled = []
    real = output.resampler.process
    output.resampler.process = lambda x: (resampled.append(len(x)), real(x))[1]
    assert not np.any(_callbacks(output, 20))  # idle: zeros, and no work for them
    assert resampled == []
    buffer.push("b", tone(0.2, dbfs=-20.0, freq=660.0))
    out = _callbacks(output, 40)
    active = np.flatnonzero(np.abs(out) > 100)
    assert active[0] < 3 * 480  # the next reply starts within 30 ms
    assert buffer.played_samples("b") == 4800 and stats.callback_errors == 0


# -- playback ---------------------------------------------------------------------------------

PLAYBACK_SCRIPT = """
import json, sys
import numpy as np
import trio
from r2d2voice.audio.devices import resolve_device
from r2d2voice.audio.playback import PlaybackStatistics, run_playback
from r2d2voice.audio.playout import AudioChunk, PlayoutBuffer

spec = sys.argv[1]
rate = None if sys.argv[2] == "default" else int(sys.argv[2])
IDLE_STOP = 0.6  # the appliance's 1 s would only make the test longer; 3x the pauses below

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
            receive, buffer, device, samplerate=rate, stats=stats, idle_stop=IDLE_STOP,
            task_status=task_status))
        async with send:
            await send.send(AudioChunk("a", tone(440, 0.2)))
            await trio.sleep(0.4)   # reply "a" runs dry mid-way: an underrun
            await send.send(AudioChunk("a", tone(440, 0.2)))
            await trio.sleep(0.4)   # a pause between replies is not an underrun
            await send.send(AudioChunk("b", tone(660, 0.3)))
            await trio.sleep(0.3 + IDLE_STOP + 0.5)  # idle: the stream stops
            stopped = stats.starts
            await send.send(AudioChunk("c", tone(880, 0.2)))  # ... and starts again
        # run_playback drains the buffer and returns on its own
    s = buffer.statistics()
    print(json.dumps({
        "played_a": buffer.played_samples("a"), "played_b": buffer.played_samples("b"),
        "played_c": buffer.played_samples("c"), "starts_before_c": stopped,
        "starts": stats.starts,
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
    assert info["played_a"] == 2 * 4800  # every pushed sample was handed to the device
    assert info["played_b"] == 7200
    assert info["played_c"] == 4800
    # the stream ran from "a" to after "b" (pauses shorter than its idle_stop), stopped
    # while nothing played, and started again for "c"
    assert info["starts_before_c"] == 1 and info["starts"] == 2
    assert info["queued"] == 0
    assert info["underruns"] == 1 and info["buffer_underruns"] == 1
    assert info["callbacks"] > 0 and info["callback_errors"] == 0

    recorded, sr = soundfile.read(wav, dtype="int16")
    assert sr == 48000
    runs = _runs(_labels(recorded, sr))
    # What the speaker played: 0.2 s of 440 Hz, silence, 0.2 s more, silence, 0.3 s of 660 Hz,
    # silence while the stream was stopped, 0.2 s of 880 Hz: nothing lost at a start or stop.
    assert [label for label, _ in runs] == ["440", "silence", "440", "silence", "660",
                                            "silence", "880"]
    assert runs[0][1] == pytest.approx(10, abs=2)
    assert runs[2][1] == pytest.approx(10, abs=2)
    assert runs[4][1] == pytest.approx(15, abs=2)
    assert runs[6][1] == pytest.approx(10, abs=2)
