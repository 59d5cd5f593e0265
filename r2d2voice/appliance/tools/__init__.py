"""Function tools the model may call: the tools file, the built-ins, the memory, a safe runner."""

from r2d2voice.appliance.tools.runner import Toolbox, ToolContext, ToolResult, load_tools

__all__ = ["ToolContext", "ToolResult", "Toolbox", "load_tools"]
