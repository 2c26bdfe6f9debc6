"""The intake and results API: the front door alerting systems and incident bots call.

``build_intake_app(store, metrics, sources, *, max_body_bytes, default_region)`` returns the
aiohttp application (``app.py``); ``auth.py`` authenticates callers, ``alertmanager.py`` and
``grafana.py`` turn alert payloads into rollback targets, ``schemas.py`` validates requests,
``ratelimit.py`` holds the per-source limits, ``openapi.py`` documents it all, and
``apiclient.py`` is the small client the CLI's ``submit``/``status``/``list`` use.

``build_intake_app`` is imported on first use, so the CLI's client commands load only the
client and not the whole server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.intake.app import build_intake_app

__all__ = ["build_intake_app"]


def __getattr__(name: str) -> Any:
    if name == "build_intake_app":
        from orchestrator.intake.app import build_intake_app

        return build_intake_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
