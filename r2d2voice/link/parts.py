"""What the link is given, once, when a run is composed: the service, the session's
configuration, the ports to the store, the console and the session gate, its policy."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from r2d2voice.link.state import Console, FrameSource, LinkPolicy, Quiet, SessionGate, Sessions
from r2d2voice.link.tools import ToolCaller, ToolOffer
from r2d2voice.link.transport import Connector, Endpoint, open_realtime
from r2d2voice.protocol.actions import Record
from r2d2voice.protocol.core import End, EndReason, ProtocolCore
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.realtime.conversation import Conversation
from r2d2voice.system.events import Events

#: makes the protocol core of one session: (the session's configuration, turns of context)
CoreFactory = Callable[[SessionConfig, tuple[tuple[str, str], ...]], ProtocolCore]


def _nothing(_: object) -> None:
    pass


@dataclass(frozen=True)
class Connected:
    """A connection opened (a service session began)."""

    session_id: str
    #: how the conversation's previous connection ended (lost, expired, recycle): this one
    #: replaces it; None: the first of its conversation
    replaces: End | None = None


def _no_counters() -> dict[str, int]:
    return {}


@dataclass
class LinkParts:
    """A run's settings and collaborators as the link sees them."""

    endpoint: Endpoint
    config: SessionConfig
    source: FrameSource
    sessions: Sessions
    gate: SessionGate
    connect: Connector = open_realtime
    policy: LinkPolicy = field(default_factory=LinkPolicy)
    console: Console = field(default_factory=Quiet)
    #: the conversation must be settled this long before the link closes at the end of input
    settle_seconds: float = 1.0
    #: the service accepted the session's configuration
    on_configured: Callable[[], None] | None = None
    #: jitters the reconnect backoff
    rng: random.Random | None = None
    #: runs the model's function calls (None: every call is rejected)
    tools: ToolCaller | None = None
    #: the tools on offer as they change, and who hears the person's words (None: the
    #: config's tools, fixed)
    offer: ToolOffer | None = None
    #: a turn is open or a reply plays (True), or not: the microphone's hand-over follows it
    busy: Callable[[bool], None] = _nothing
    #: the other parts' counters (capture drops, gated frames, underruns), as they are now;
    #: each session row stores its share
    counters: Callable[[], dict[str, int]] = _no_counters
    #: sees every record as it is queued for the recorder, in order, before any wait (the
    #: budget's spend, the metrics); synchronous, it must not block
    on_record: Callable[[Record], None] = _nothing
    #: a connection opened (:class:`Connected`) or ended (how: its ``EndReason``)
    on_connection: Callable[[Connected | EndReason], None] = _nothing
    #: the wire protocol (default: the GA Realtime core)
    protocol: CoreFactory = Conversation
    #: each session's configuration, made as it starts (the memory the robot has by then);
    #: None: ``config`` as it is
    configure: Callable[[SessionConfig], Awaitable[SessionConfig]] | None = None
    #: the run's event stream (system/events.py; a silent hub by default)
    events: Events = field(default_factory=Events)

    async def new_core(self, context: list[tuple[str, str]]) -> ProtocolCore:
        """A session's core: its configuration made now (the memory it has by now), offering
        the tools on offer now."""
        config = self.config if self.configure is None else await self.configure(self.config)
        if self.offer is not None:
            config = replace(config, tools=self.offer.session_tools())
        return self.protocol(config, tuple(context))
