"""``r2d2voice run`` at its budget cap, end to end on the PulseAudio rig (tests/pulse.py): the
embedded local backend priced as if billed (a 1 s reply costs $0.10), a cap of $0.10 a day,
systemd's notify socket bound here, ``R2D2_METRICS`` scraped over HTTP.

Said once: R2 answers, the reply plays out, the sad beep follows and the session closes;
STATUS= says "daily budget reached ($0.10 of $0.10), back tomorrow". Said again: the sad beep
on the speaker, and no connection. The in-process behaviour (the day turning, the wake word)
is tests/test_budget_run.py's, on the MockClock."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families
from pulse import PulseRig
from support import PRICED, NotifyListener, free_port
from test_run_live import run_service, speech  # noqa: F401  (speech: the module's fixture)
from test_run_wake import RECORD_RATE, pieces_heard

from r2d2voice.audio import earcons

pytestmark = pytest.mark.pulse

CLOSED = "daily budget reached ($0.10 of $0.10), back tomorrow"


@dataclass
class CappedRun:
    code: int
    statuses: list[str]  # STATUS= values before SIGTERM, in order
    log: str
    db: Path
    #: what the speaker played from the first request to the close, and for the second
    after_reply: np.ndarray
    after_refusal: np.ndarray
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def statuses(notify: NotifyListener) -> list[str]:
    return [line.removeprefix("STATUS=") for line in notify.lines()
            if line.startswith("STATUS=")]


@pytest.fixture(scope="module")
def capped(pulse_rig: PulseRig, tmp_path_factory: pytest.TempPathFactory,
           speech: Path) -> CappedRun:  # noqa: F811
    workdir = tmp_path_factory.mktemp("budget")
    port = free_port()
    with NotifyListener() as notify, run_service(
        pulse_rig, workdir, notify, [], R2D2_INPUT_DEVICE="pulse", R2D2_OUTPUT_DEVICE="pulse",
        R2D2_BUDGET_DAILY_USD="0.10", R2D2_METRICS=f"127.0.0.1:{port}", **PRICED,
    ) as service:
        service.wait_ready()
        with pulse_rig.record(workdir / "reply.wav"):
            pulse_rig.play(speech)
            service.wait_for("the budget's close", lambda: statuses(notify)[-1:] == [CLOSED],
                             timeout=20)
            time.sleep(1.5)  # the sad beep (queued before STATUS= said it) through the device
        with pulse_rig.record(workdir / "refusal.wav"):
            pulse_rig.play(speech)  # returns once it has all been played
            time.sleep(1.5)  # the VAD's onset, the sad beep, the device's latency
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
        said = statuses(notify)
        code = service.terminate()
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    heard = {}
    for part in ("reply", "refusal"):
        heard[part], rate = soundfile.read(workdir / f"{part}.wav", dtype="float32")
        assert rate == RECORD_RATE
    return CappedRun(code, said, service.log(), workdir / "c.db", heard["reply"],
                     heard["refusal"], metrics)


def test_the_session_closes_after_the_reply_and_status_says_why(capped: CappedRun):
    assert capped.code == 0, capped.log
    assert "speaking" in capped.statuses, capped.statuses
    assert capped.statuses[-1] == CLOSED, capped.statuses
    assert capped.statuses.index(CLOSED) > capped.statuses.index("speaking")
    # one WARNING for the cap (the 80 % warning is not given: one reply took it all)
    warnings = [line for line in capped.log.splitlines() if "WARNING" in line]
    assert len([w for w in warnings if "daily budget reached ($0.10 of $0.10)" in w]) == 1
    assert "Traceback" not in capped.log
    with contextlib.closing(sqlite3.connect(capped.db)) as db:
        sessions = db.execute("SELECT count(*), count(ended_at) FROM sessions").fetchone()
        roles = [r for r, in db.execute("SELECT role FROM messages ORDER BY seq")]
    assert sessions == (1, 1) and roles == ["user", "assistant"]  # one session, closed


def test_the_sad_beep_is_heard_at_the_close_and_when_spoken_to(capped: CappedRun):
    sad = earcons.sad()
    # the sad beep in 30 ms pieces: 13 sounding ones; most heard each time (a busy machine can
    # stall the sound server and split one)
    assert pieces_heard(capped.after_reply, sad) >= 8, "no sad beep at the close"
    assert pieces_heard(capped.after_refusal, sad) >= 8, "no sad beep when spoken to"
    # and after the reply, nothing as loud as a reply was played: no second conversation
    assert np.max(np.abs(capped.after_refusal)) < 10 ** (-15 / 20)
    assert "someone spoke while the daily budget is spent: no connection" in capped.log


def test_the_metrics_show_the_spend_and_the_closed_session(capped: CappedRun):
    m = capped.metrics
    assert m[("r2d2voice_cost_usd_total", ())] == pytest.approx(0.1)
    assert m[("r2d2voice_budget_remaining_usd", ())] == 0
    assert m[("r2d2voice_responses_total", (("status", "completed"),))] == 1
    assert m[("r2d2voice_turns_total", ())] == 1
    assert m[("r2d2voice_connected", ())] == 0  # closed by the budget
    assert m[("r2d2voice_device_present", (("kind", "input"),))] == 1
    assert m[("r2d2voice_device_present", (("kind", "output"),))] == 1


def test_a_restart_the_same_day_is_ready_closed_and_connects_for_nobody(
        pulse_rig: PulseRig, capped: CappedRun, tmp_path: Path):
    """The spend is read from the record: ``run`` on the same database is READY (systemd must
    not time it out), says the budget in STATUS= and opens no session."""
    env = {"R2D2_INPUT_DEVICE": "pulse", "R2D2_OUTPUT_DEVICE": "pulse",
           "R2D2_BUDGET_DAILY_USD": "0.10", **PRICED}
    shutil.copy(capped.db, tmp_path / "c.db")  # (the run before closed it cleanly)
    with NotifyListener() as notify, run_service(pulse_rig, tmp_path, notify, [],
                                                 **env) as service:
        service.wait_ready()
        said = statuses(notify)
        code = service.terminate()
    assert code == 0, service.log()
    assert said[-1] == CLOSED, said
    assert "listening" not in said
    log = service.log()
    assert f"ready: listening on pulse, speaking on pulse ({CLOSED})" in log, log
    with contextlib.closing(sqlite3.connect(tmp_path / "c.db")) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (1,)
