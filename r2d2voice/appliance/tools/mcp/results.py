"""What an MCP tool's result becomes for the model: its text, cut at 16 KiB (sans-IO)."""

from __future__ import annotations

import json
from typing import Any

from r2d2voice.appliance.tools.process import OUTPUT_CAP


def result_text(result: Any) -> str:
    """The text parts of a ``CallToolResult`` joined by newlines; other parts named in a few
    words (the model hears no images); structured content when there is no text at all."""
    parts: list[str] = []
    for item in getattr(result, "content", None) or []:
        kind = getattr(item, "type", "?")
        if kind == "text":
            parts.append(item.text)
        elif kind == "resource" and hasattr(item.resource, "text"):
            parts.append(item.resource.text)
        elif kind == "resource_link":
            parts.append(f"[resource {getattr(item, 'uri', '')}]")
        else:
            parts.append(f"[{kind} {getattr(item, 'mime_type', '') or ''}]".replace(" ]", "]"))
    structured = getattr(result, "structured_content", None)
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    return cut("\n".join(parts).strip())


def cut(text: str, cap: int = OUTPUT_CAP) -> str:
    """``text`` within ``cap`` bytes of UTF-8, saying so when it was cut."""
    data = text.encode()
    if len(data) <= cap:
        return text
    return data[:cap].decode("utf-8", "ignore") + f"…[output cut at {cap // 1024} KiB]"
