"""The listening switch (MQTT's ``…/listening/set``, Home Assistant's switch): a session gate
policy wrapped around the run's gate (``gate.py``).

Off: no session, and the microphone goes nowhere — not to the service, not even to the wake
word detector or the dormant VAD (their frames are dropped at the gate). A conversation in
progress when it is switched off ends at once (``conversation_ended {reason: "listening
off"}``). On again: the inner gate decides as before (always listening opens a session at
once after a live microphone hears speech, as after a hang-up; the wake gate waits for the
word; a wake from outside while off is dropped). It wraps the budget too (``budget.py``): off,
not even a spent budget's sad beep answers. It starts on; the run does not keep it across
restarts.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from r2d2voice.appliance.chain import Router
from r2d2voice.appliance.gate import Earcon, WakeTrigger
from r2d2voice.link.state import Opening, SessionGate
from r2d2voice.link.turns import LinkView
from r2d2voice.protocol.core import EndReason

log = logging.getLogger("r2d2voice.appliance.switch")

#: why a conversation ended when the switch went off
LISTENING_OFF = "listening off"


class Gate(SessionGate, Router, Protocol):
    """A session gate as the supervisor, the microphone chain and the pipeline see it (and a
    policy wrapped around it: ``budget.py``)."""

    waiting_status: str

    def attach(self, link: LinkView, earcon: Earcon) -> None: ...

    def heard(self, frame: bytes) -> str | None: ...

    def closed_by(self, reason: str) -> None: ...


class ListeningSwitch:
    """``inner`` while on; nothing while off (see the module docstring). ``set(on)`` from the
    run's thread."""

    def __init__(self, inner: Gate, *, on: bool = True,
                 trigger: WakeTrigger | None = None) -> None:
        self.inner = inner
        self.on = on
        #: external wakes (``r2d2voice wake``) while off are dropped, not kept for later
        self.trigger = trigger
        self._changed = trio.Event()
        self._input_ended = False

    def set(self, on: bool) -> None:
        if on != self.on:
            self.on = on
            log.info("listening switched %s", "on" if on else "off: no session, the "
                     "microphone goes nowhere")
            self._changed.set()
            self._changed = trio.Event()

    async def _until(self, on: bool) -> None:
        while self.on != on and not self._input_ended:
            await self._changed.wait()

    # -- the run -----------------------------------------------------------------------------
    def attach(self, link: LinkView, earcon: Earcon) -> None:
        self.inner.attach(link, earcon)

    @property
    def waiting_status(self) -> str:
        return str(self.inner.waiting_status)

    def heard(self, frame: bytes) -> str | None:
        """Off, nobody is heard (for a policy around this one)."""
        return self.inner.heard(frame) if self.on else None

    def closed_by(self, reason: str) -> None:
        self.inner.closed_by(reason)

    # -- the chain ---------------------------------------------------------------------------
    @property
    def conversing(self) -> bool:
        return self.inner.conversing

    def route(self, frame: bytes, passed: list[bytes], index: int) -> list[bytes]:
        if not self.on:
            if self.trigger is not None and self.trigger.take():
                log.info("wake: ignored, listening is switched off")
            return []
        return self.inner.route(frame, passed, index)

    def input_ended(self) -> None:
        self._input_ended = True
        self._changed.set()
        self.inner.input_ended()

    # -- the supervisor ----------------------------------------------------------------------
    async def wait_open(self) -> Opening | None:
        await self._until(True)
        if self._input_ended and not self.on:
            return None
        return await self.inner.wait_open()

    def take_preroll(self) -> list[bytes] | None:
        return self.inner.take_preroll()

    async def wait_close(self) -> str:
        """The inner gate's reason, or :data:`LISTENING_OFF` if the switch goes off first."""
        closed: list[str] = []
        async with trio.open_nursery() as nursery:

            async def inner() -> None:
                closed.append(await self.inner.wait_close())
                nursery.cancel_scope.cancel()

            async def switched_off() -> None:
                await self._until(False)
                if not self.on:
                    self.inner.closed_by(LISTENING_OFF)
                    closed.append(LISTENING_OFF)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(inner)
            nursery.start_soon(switched_off)
        return closed[0]

    def ended(self, reason: EndReason) -> bool:
        goes_on = self.inner.ended(reason)
        return goes_on and self.on

    async def over(self, session_ids: list[str]) -> None:
        await self.inner.over(session_ids)
