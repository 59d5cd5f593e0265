"""r2d2voice: an always-on voice appliance speaking OpenAI's GA Realtime protocol on trio."""

__version__ = "0.1.0"
