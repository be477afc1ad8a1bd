"""The operator's dashboard: an admin-only aiohttp app on its own port (see docs/dashboard.md)."""

from .app import Dashboard

__all__ = ["Dashboard"]
