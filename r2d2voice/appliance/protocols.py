"""Which protocol core a run's link drives (``LinkParts.protocol``), from the service planned
in ``endpoints.py``: the GA Realtime core, or GPT-Live's, built from the same session
configuration (instructions, tools) and the turns of context the supervisor carries into a
new session (after ``expired``, a lost link or recycling); and what a full-duplex model
cannot work with."""

from __future__ import annotations

from r2d2voice.appliance.endpoints import LIVE, Service
from r2d2voice.errors import ConfigError
from r2d2voice.link.parts import CoreFactory
from r2d2voice.live.client_events import LiveConfig
from r2d2voice.live.conversation import LiveConversation
from r2d2voice.realtime.client_events import SessionConfig
from r2d2voice.realtime.conversation import Conversation
from r2d2voice.system.config import Settings

__all__ = ["check_duplex", "core_factory"]


def core_factory(service: Service, settings: Settings) -> CoreFactory:
    """What makes each session's core for ``service``."""
    if service.protocol != LIVE:
        return Conversation
    voice = service.voice or settings.live_voice

    def live(config: SessionConfig, context: tuple[tuple[str, str], ...]) -> LiveConversation:
        # the context (oldest first) becomes session.start's input: the robot keeps what was
        # said, within the service's limits
        return LiveConversation(LiveConfig(
            instructions=config.instructions, model=settings.live_model, voice=voice,
            tools=config.tools, delegate_model=settings.live_delegate_model,
        ).with_history(context))

    return live


def check_duplex(service: Service, settings: Settings, *, live_source: bool) -> None:
    """A full-duplex model behind the half-duplex echo gate can never be interrupted (the
    microphone is muted whenever it speaks, and it speaks whenever it likes): ConfigError
    (exit 3) for GPT-Live with ``R2D2_ECHO=half`` (or the older ``R2D2_DUPLEX=half``) on a
    microphone. A file has no gate."""
    if service.protocol != LIVE or not live_source or settings.echo_mode() != "half":
        return
    key = "duplex" if settings.sources.get("echo", "default") == "default" else "echo"
    raise ConfigError(
        f"R2D2_{key.upper()}=half ({settings.where(key)}) cannot work with GPT-Live "
        f"(R2D2_BACKEND={settings.backend}"
        + (", R2D2_LOCAL_PROTOCOL=live" if service.backend == "local" else "")
        + "): a full-duplex model behind a half-duplex gate can never be interrupted. Use "
        "the echo canceller (R2D2_ECHO=aec, the default), a headset (R2D2_ECHO=off), or a "
        "Realtime backend")
