"""What the shell must do about a server event: play, stop, send, store — the vocabulary every
protocol core (``realtime/``, ``live/``) answers in.

None carries wall-clock time: the storage writer stamps wall-time labels when it writes.
``seq`` is the conversation order within one service session (one Conversation), from 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from r2d2voice.protocol.tool_records import StoreToolCall, StoreToolResult


class ClientEvent(Protocol):
    """A typed client event of some protocol core; the core that made it serialises it."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Play:
    """Queue reply audio (24 kHz mono PCM16 bytes) for the speaker."""

    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BargeIn:
    """The user started speaking: stop the speaker now and report what was played with
    :meth:`Conversation.interrupted`."""

    user_item_id: str


@dataclass(frozen=True, slots=True)
class UserSpeaking:
    """The service hears the person speaking (``user_speaking``)."""

    user_item_id: str


@dataclass(frozen=True, slots=True)
class UserStopped:
    """The service heard the person stop speaking (``user_stopped``); their turn is to be
    answered."""

    user_item_id: str


@dataclass(frozen=True, slots=True)
class AudioDone:
    """No more audio of reply ``item_id`` will come: its response is over (completed, cut or
    failed) or the connection is gone. What is queued of it still plays."""

    item_id: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send this client event (serialised by :meth:`Conversation.send`)."""

    event: ClientEvent


@dataclass(frozen=True, slots=True)
class CallTool:
    """Run tool ``name`` with ``arguments`` (JSON text as the service sent it) and report with
    :meth:`Conversation.tool_finished`. Only calls of a ``completed`` response are run."""

    call_id: str
    name: str
    arguments: str = field(repr=False)
    response_id: str | None = None
    #: the call item's place in the conversation (a confirmation must come after it)
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class HangUp:
    """The robot said goodbye (``end_conversation``): close this session once the speaker has
    played it."""


@dataclass(frozen=True, slots=True)
class Notice:
    """Something worth a line in the log that is neither stored nor an error (the service's
    ordinary races)."""

    text: str


@dataclass(frozen=True, slots=True)
class StoreSession:
    service_session_id: str
    model: str | None


@dataclass(frozen=True, slots=True)
class StoreMessage:
    role: str
    item_id: str
    seq: int
    text: str
    response_id: str | None = None
    raw: str | None = field(default=None, repr=False)
    partial: bool = False


@dataclass(frozen=True, slots=True)
class StoreInterrupted:
    item_id: str
    seq: int
    played_ms: int


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """A response's status: ``in_progress`` at ``response.created``, final at ``.done``."""

    response_id: str
    status: str
    usage: dict[str, Any] | None = None
    status_details: dict[str, Any] | None = None
    #: end of user speech -> first reply audio received, in ms (None without a speech turn)
    first_audio_ms: float | None = None


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Billed time of a service session billed by the second (GPT-Live): the service's
    current total (``session.usage.updated``, final at ``session.closed``). Each replaces the
    one before for ``service_session_id``: totals are never summed."""

    service_session_id: str
    seconds: float
    final: bool = False


@dataclass(frozen=True, slots=True)
class StoreLatency:
    """End of user speech -> first reply sample handed to the speaker, in ms."""

    response_id: str
    first_played_ms: float


@dataclass(frozen=True, slots=True)
class StoreError:
    type: str
    code: str | None
    message: str
    fatal: bool


Record = (
    StoreSession | StoreMessage | StoreInterrupted | StoreResponse | StoreUsage | StoreLatency
    | StoreError | StoreToolCall | StoreToolResult
)
Action = (Play | BargeIn | UserSpeaking | UserStopped | AudioDone | Send | CallTool | HangUp
          | Notice | Record)
