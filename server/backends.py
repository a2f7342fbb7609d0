"""Pick the backend a server config names (the only module that knows them all)."""

from __future__ import annotations

from server.config import ServerConfig
from server.engine import GuardEngine


def build_engine(config: ServerConfig) -> GuardEngine:
    """The backend ``config.backend`` names (slow: call it off the event loop)."""
    if config.backend == "vllm":
        from server.upstream import build_upstream_engine

        return build_upstream_engine(config)
    from server.local import build_local_engine

    return build_local_engine(config)
