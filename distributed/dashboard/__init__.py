"""The center's live web dashboard (see docs/dashboard.md).

- :mod:`.plugin`: :class:`DashboardPlugin`, the scheduler plugin that keeps
  bounded counts, a task stream and an event log;
- :mod:`.state`: what the pages show, as JSON-safe dicts (pure);
- :mod:`.metrics`: ``/metrics`` for Prometheus;
- :mod:`.routes`: the HTTP routes and the WebSocket, served by
  :class:`~distributed.http.HTTPCenter`; ``static/`` holds the page, its one
  script and its style.
"""

from .plugin import DashboardPlugin

__all__ = ["DashboardPlugin"]
