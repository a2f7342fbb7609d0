"""trajguard's OpenAI-compatible streaming proxy.

The server depends on the :class:`~server.engine.GuardEngine` interface, never on a
concrete engine; :class:`~server.local.LocalGuardEngine` runs the guarded decoder
in-process. Build the ASGI app with :func:`server.app.build_app`.
"""

from server.config import ServerConfig

__all__ = ["ServerConfig"]
