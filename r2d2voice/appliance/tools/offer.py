"""The tools a run offers: the tools file's (``R2D2_TOOLS``) and, while ``R2D2_MEMORY`` is on and
text is kept (not privacy mode), the memory's."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from r2d2voice.appliance.tools.config import read_tools_file
from r2d2voice.appliance.tools.memory import MEMORY_TOOLS, Memory
from r2d2voice.appliance.tools.runner import Toolbox
from r2d2voice.errors import ConfigError

if TYPE_CHECKING:
    from r2d2voice.system.config import Settings

__all__ = ["memory_enabled", "open_toolbox"]


def memory_enabled(settings: Settings) -> bool:
    """The memory is on: ``R2D2_MEMORY`` on and not privacy mode (``R2D2_STORE_TEXT=false``
    means no memory at all: no tools, nothing in the instructions, nothing indexed)."""
    return settings.memory and settings.store_text


def open_toolbox(settings: Settings, *, state_path: str | os.PathLike[str] | None,
                 variables: Mapping[str, str] | None = None) -> Toolbox | None:
    """The Toolbox of a run: the tools file's tools (``state_path`` keeps their volume) and the
    memory tools; None when there are neither. ConfigError (exit 3) for a bad tools file, or
    one naming a tool like a memory tool while the memory is on."""
    spec = read_tools_file(settings.tools, variables) if settings.tools else None
    memory = Memory(settings.db) if memory_enabled(settings) else None
    if spec is None:
        return None if memory is None else Toolbox(memory=memory)
    if memory is not None:
        for name in (*spec.builtins, *(tool.name for tool in spec.tools)):
            if name in MEMORY_TOOLS:
                raise ConfigError(
                    f"{spec.path}: tool {name!r}: the name of a memory tool (R2D2_MEMORY is "
                    "on); rename it, or set R2D2_MEMORY=off")
    return Toolbox(spec.builtins, spec.tools, state_path=state_path, memory=memory,
                   mcp=spec.mcp)
