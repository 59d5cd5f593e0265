"""Double talk: is someone speaking over the robot? Logic on 10 ms levels (numpy for one
correlation), the caller's clock.

WebRTC's AEC3 removes the robot's voice from the microphone, but while it plays it also
suppresses much of a person talking over it (with the echo 13 dB above the person only a
quarter of their chunks stay above the service's VAD level), and on tonal replies (R2's
trills and warbles) it leaves short residual bursts. So each 10 ms chunk of its output is
compared with what the *reference* predicts:

- **Delay**: the echo comes some time after its reference (the room, and whatever latency
  PortAudio does not report): the lag that best correlates the microphone's levels with the
  reference's is found every half second, and the reference's level is taken that late.
- **Predicted residual**: the reference level held over the room's tail (``TAIL_DB_PER_CHUNK``:
  -60 dB in 0.3 s) plus a *coupling*: the 90th percentile of output-minus-reference, tracked
  while nobody seems to speak (a quantile tracker: fast up, slow down). It follows how well
  the canceller is doing with this speaker, this room, this kind of sound.
- **Evidence**: a chunk ``MARGIN_DB`` above the predicted residual, above ``EVIDENCE_DBFS`` and
  ``FLOOR_MARGIN_DB`` above the room's noise floor (tracked while nothing plays).
- **Not a person**: a chunk the canceller removed almost nothing from (output within
  ``FAILED_DB`` of its input) while the input is no louder than the expected echo (the
  reference plus the speaker-to-mic *coupling* before cancellation, its 90th percentile
  tracked likewise) is the canceller missing a beat on a tonal sound, not a person; it is guarded.
- **Tonal echo**: on a tonal reply the canceller misses a beat at each new note; a chunk
  whose energy sits at the reference's few spectral peaks (``echo_like``, computed by the
  caller only for candidates) is echo, not a person.
- **Guard**: while the speaker is active every chunk is brought down to the noise floor (the
  canceller's residual never reaches the service: the robot never hears itself) unless it is
  evidence *and* the playback has been ducked long enough for the duck to reach the
  microphone (the echo's lag plus ``SETTLE_CHUNKS``): a burst of residual is 30 dB down by
  then, a person is not. Passing evidence has a short hangover so words are not chopped.
- **Duck**: ``EVIDENCE_CHUNKS`` of the last ``WINDOW_CHUNKS`` with evidence duck the playback
  by ``DUCK_DB`` for ``HOLD_S``, held while evidence goes on. Ducked, the echo falls below the
  person, the canceller lets them through, the service's VAD hears them and interrupts the
  reply (the link's barge-in). The reference is tapped after the duck, so the echo path the
  canceller learnt stays valid.
- **Recovery**: a cough or a door is not followed by more evidence: the hold runs out and the
  reply comes back up where it was (``recoveries``), nothing truncated.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

EVIDENCE_DBFS = -45.0
FLOOR_MARGIN_DB = 10.0
MARGIN_DB = 6.0
WINDOW_CHUNKS = 10
EVIDENCE_CHUNKS = 3
HANGOVER_CHUNKS = 4
DUCK_DB = -30.0
#: once ducked, the duck needs the echo's lag plus this many chunks to reach the microphone;
#: only then does evidence pass (a residual burst of the canceller's is 30 dB down by then)
SETTLE_CHUNKS = 5
HOLD_S = 0.6
#: the room's reverberation: -60 dB over 0.3 s is -2 dB per 10 ms chunk
TAIL_DB_PER_CHUNK = 2.0
#: below this the reference is silence (nothing that could echo)
ACTIVE_DBFS = -65.0
#: the couplings are first measured on a reference at least this loud
LEARN_FROM_DBFS = -40.0
#: the coupling's quantile tracker (90th percentile): up this much per chunk above it, down
#: a ninth of it below. It starts at the echo before any cancellation (mic minus reference).
COUPLING_STEP_DB = 1.8
FAR_BELOW_DB = 10.0
COUPLING_RANGE_DB = (-45.0, 10.0)
#: output within this of the input: the canceller removed (almost) nothing
FAILED_DB = 4.0
#: the reference's level is held this many chunks before it decays (the delay's jitter, the
#: room's first reflections)
HOLD_CHUNKS = 2
#: the echo's delay behind the reference, from their levels: the lag (in chunks, up to
#: LAG_MAX) that best correlates the last LAG_HISTORY chunks, looked for every LAG_EVERY
LAG_MAX = 30
LAG_HISTORY = 200
LAG_EVERY = 25
#: (a lag is believed once found twice in a row, while nobody seems to speak); until then the
#: echo may come from anywhere in the last UNKNOWN_LAG_CHUNKS of reference
UNKNOWN_LAG_CHUNKS = 8
#: a lag is believed when the correlation of the levels is at least this
LAG_MIN_CORRELATION = 0.5
#: the noise floor estimate follows the quietest chunk of each second while nothing plays
FLOOR_WINDOW_S = 1.0


@dataclass
class DoubleTalkStatistics:
    """``ducks``: times the playback was ducked; ``recoveries``: ducks that ran out with the
    reply still playing (no barge-in followed: a cough, a door, a false alarm);
    ``evidence_chunks``: 10 ms chunks taken for someone speaking; ``guarded_chunks``: chunks
    brought down to the noise floor as echo."""

    ducks: int = 0
    recoveries: int = 0
    evidence_chunks: int = 0
    guarded_chunks: int = 0


class DoubleTalk:
    """Per 10 ms chunk of canceller output: the playback's duck gain and the chunk's gain."""

    def __init__(self, *, duck_db: float = DUCK_DB, hold_s: float = HOLD_S,
                 guard: bool = True) -> None:
        self.ducked_gain = 10 ** (duck_db / 20)
        self.hold_s = hold_s
        self.guard = guard
        self.stats = DoubleTalkStatistics()
        self.floor_dbfs = -70.0
        self.coupling_db: float | None = None
        self.erl_db: float | None = None
        self.hold_dbfs = -120.0
        #: the echo's delay behind the reference, in 10 ms chunks (see ``_find_lag``)
        self.lag = 0
        self._refs: deque[float] = deque(maxlen=LAG_HISTORY + LAG_MAX)
        self._mics: deque[float] = deque(maxlen=LAG_HISTORY + LAG_MAX)
        self._since_lag = 0
        #: times a (new) lag was believed
        self.lags_found = 0
        self._candidate: int | None = None
        self._window: deque[bool] = deque(maxlen=WINDOW_CHUNKS)
        self._ducked_until = -math.inf
        self._ducked_since = -math.inf
        self._hangover = 0
        self._floor_min = math.inf
        self._floor_since: float | None = None

    def ducked(self, now: float) -> bool:
        return now < self._ducked_until

    def rest(self) -> None:
        """Nothing plays any more: forget the moment, keep what was learnt of the room."""
        self._silent()
        self.hold_dbfs = -120.0
        self._refs.clear()  # the levels' history is one stretch of playing (the lag stays)
        self._mics.clear()
        self._candidate = None

    def _silent(self) -> None:
        """The reference fell silent: no duck, no evidence pending."""
        self._window.clear()
        self._ducked_until = -math.inf
        self._hangover = 0

    def forget(self) -> None:
        """A new canceller (another device): what was learnt of the old one no longer holds."""
        self.rest()
        self.coupling_db = self.erl_db = None
        self.lag = 0

    def quiet(self, level_dbfs: float, now: float) -> None:
        """A stretch of microphone audio with nothing playing (the noise floor's estimate)."""
        if self._floor_since is None:
            self._floor_since, self._floor_min = now, level_dbfs
            return
        self._floor_min = min(self._floor_min, level_dbfs)
        if now - self._floor_since >= FLOOR_WINDOW_S:
            self.floor_dbfs = max(-90.0, self._floor_min)
            self._floor_since, self._floor_min = now, math.inf

    def update(self, out_dbfs: float, ref_dbfs: float, mic_dbfs: float, now: float,
               echo_like: Callable[[], bool] | None = None) -> tuple[float, float]:
        """(duck gain for the playback, gain for this chunk) for a chunk of canceller output
        at ``out_dbfs`` whose reference (what played alongside) was at ``ref_dbfs`` and whose
        microphone input was at ``mic_dbfs``; ``echo_like()`` says whether the chunk's
        spectrum is the reference's (asked only of a chunk loud enough to be evidence)."""
        self._refs.append(max(ref_dbfs, -70.0))
        self._mics.append(max(mic_dbfs, -70.0))
        self._since_lag += 1
        if self._since_lag >= LAG_EVERY and not self.ducked(now) and not any(self._window):
            self._since_lag = 0  # looked for only while nobody seems to be speaking
            self._find_lag()
        self.hold_dbfs = max(self._lagged(), self.hold_dbfs - TAIL_DB_PER_CHUNK)
        if self.hold_dbfs < ACTIVE_DBFS:
            self.quiet(out_dbfs, now)
            self._silent()
            return 1.0, 1.0
        self._floor_since = None
        lo, hi = COUPLING_RANGE_DB
        if self.coupling_db is None or self.erl_db is None:
            if self.hold_dbfs < LEARN_FROM_DBFS:  # too little played to tell: assume the worst
                self._window.append(False)
                return (self.ducked_gain if self.ducked(now) else 1.0), self._guard(out_dbfs)
            # not cancelling yet: the residual is the whole echo
            self.coupling_db = self.erl_db = min(hi, max(lo, mic_dbfs - self.hold_dbfs))
        predicted = self.hold_dbfs + self.coupling_db
        threshold = max(predicted + MARGIN_DB, EVIDENCE_DBFS, self.floor_dbfs + FLOOR_MARGIN_DB)
        failed = (out_dbfs > mic_dbfs - FAILED_DB
                  and mic_dbfs < self.hold_dbfs + self.erl_db + FAILED_DB)
        evidence = (out_dbfs > threshold and not failed
                    and not (echo_like is not None and echo_like()))
        was_ducked = self.ducked(now)
        if not was_ducked and not evidence and self.hold_dbfs >= LEARN_FROM_DBFS:
            self._learn(out_dbfs - self.hold_dbfs, mic_dbfs - self.hold_dbfs)
        self._window.append(evidence)
        if evidence:
            self.stats.evidence_chunks += 1
            if sum(self._window) >= EVIDENCE_CHUNKS:
                if not was_ducked:
                    self.stats.ducks += 1
                    self._ducked_since = now
                self._ducked_until = now + self.hold_s
        elif was_ducked and not self.ducked(now + 0.01):
            self.stats.recoveries += 1  # the hold runs out with the reply still playing
        duck = self.ducked_gain if self.ducked(now) else 1.0
        if not self.guard:
            return duck, 1.0
        lag = self.lag if self.lags_found else UNKNOWN_LAG_CHUNKS
        settled = self.ducked(now) and now - self._ducked_since >= (lag + SETTLE_CHUNKS) / 100
        if settled and evidence:
            self._hangover = HANGOVER_CHUNKS
            return duck, 1.0
        if settled and self._hangover > 0:
            self._hangover -= 1
            return duck, 1.0
        return duck, self._guard(out_dbfs)

    def _guard(self, out_dbfs: float) -> float:
        """The gain that brings an echo chunk down to the noise floor."""
        self.stats.guarded_chunks += 1
        return min(1.0, 10 ** ((self.floor_dbfs - out_dbfs) / 20))

    def _lagged(self) -> float:
        """The reference's level where the echo now comes from: around the lag once it is
        known (``HOLD_CHUNKS`` of jitter), anywhere up to ``UNKNOWN_LAG_CHUNKS`` before."""
        refs = self._refs
        if self.lags_found:
            newest, oldest = max(0, self.lag - 1), self.lag + HOLD_CHUNKS
        else:
            newest, oldest = 0, UNKNOWN_LAG_CHUNKS
        hi = len(refs) - newest
        lo = max(0, len(refs) - 1 - oldest)
        level = max((refs[i] for i in range(lo, hi)), default=-120.0)
        return level if level > -70.0 else -120.0

    def _find_lag(self) -> None:
        """The echo's delay: the lag that best correlates the microphone's levels with the
        reference's, once enough has played (kept when nothing is clear)."""
        if len(self._refs) < LAG_HISTORY // 4:
            return
        ref = np.fromiter(self._refs, float)
        mic = np.fromiter(self._mics, float)
        if ref.std() < 3.0:
            return  # too little variation to tell
        n = len(ref) - LAG_MAX
        a = ref[:n] - ref[:n].mean()
        best, best_lag = LAG_MIN_CORRELATION, None
        for lag in range(LAG_MAX + 1):
            b = mic[lag:lag + n] - mic[lag:lag + n].mean()
            denom = np.sqrt((a * a).sum() * (b * b).sum())
            corr = float((a * b).sum() / denom) if denom > 0 else 0.0
            if corr > best:
                best, best_lag = corr, lag
        if best_lag is None:
            return
        confirmed = self._candidate is not None and abs(best_lag - self._candidate) <= 1
        if confirmed and (best_lag != self.lag or not self.lags_found):
            self.lag = best_lag
            self.lags_found += 1  # the same lag twice in a row: believed
        self._candidate = best_lag

    def _learn(self, excess_db: float, erl_db: float) -> None:
        """The 90th percentiles (+step above, -step/9 below) of the residual coupling and of
        the raw one (the echo before cancellation, relative to the reference's envelope)."""
        assert self.coupling_db is not None and self.erl_db is not None
        self.coupling_db = _quantile_step(self.coupling_db, excess_db)
        self.erl_db = _quantile_step(self.erl_db, erl_db)


def _quantile_step(estimate: float, sample: float) -> float:
    """One step of a 90th-percentile tracker: up ``COUPLING_STEP_DB`` when the sample is above,
    down a ninth of it below (five times that when far below: a canceller converging)."""
    lo, hi = COUPLING_RANGE_DB
    if sample > estimate:
        step = COUPLING_STEP_DB
    else:
        step = -COUPLING_STEP_DB / 9 * (5 if sample < estimate - FAR_BELOW_DB else 1)
    return min(hi, max(lo, estimate + step))
