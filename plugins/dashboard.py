"""The dashboard plugin: the admin web dashboard and ``GET /metrics``, and the metrics of fine-tunes and feedback.

Off by default. Config (``dashboard``)::

    enabled: false            # serve the dashboard (and /metrics) on its own port
    host: 127.0.0.1           # loopback unless you put it behind a TLS proxy
    port: 8090
    admins: {}                # name -> password or token, from the environment: {alice: ${DASHBOARD_PASSWORD}}
    session_hours: 12
    secure_cookie: false      # true behind HTTPS: the cookie is then never sent in clear
    metrics: true             # also serve GET /metrics (Prometheus text format) on this port
    metrics_token: null       # if set, /metrics needs "Authorization: Bearer <token>"

Request counts and latencies are measured by the bot itself (`chatcore.metrics`);
this plugin adds what arrives through hooks: fine-tune outcomes, gate losses, ratings.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from chatcore import hookimpl
from chatcore.config import Field

if TYPE_CHECKING:
    from chatcore.dashboard import Dashboard


@hookimpl
def register_config(register):
    register("dashboard", {
        "enabled": Field(bool, False, help="Serve the admin dashboard and /metrics on their own port."),
        "host": Field(str, "127.0.0.1", help="Bind address (keep loopback unless behind a TLS proxy)."),
        "port": Field(int, 8090, help="Dashboard port."),
        "admins": Field(dict, {}, secret=True,
                        help="Admin name -> password or token from the environment: {alice: ${DASHBOARD_PASSWORD}}."),
        "session_hours": Field((int, float), 12, help="How long a login lasts."),
        "secure_cookie": Field(bool, False, help="Mark the session cookie Secure (set it when served over HTTPS)."),
        "trusted_proxies": Field(list, [], help="Addresses or networks of your reverse proxies: behind them failed "
                                                "logins count per client (from X-Forwarded-For), not per proxy."),
        "metrics": Field(bool, True, help="Also serve GET /metrics in the Prometheus text format."),
        "metrics_token": Field(str, None, secret=True,
                               help="If set, /metrics needs 'Authorization: Bearer <token>': ${METRICS_TOKEN}."),
    })


_servers: "weakref.WeakKeyDictionary[Any, Dashboard]" = weakref.WeakKeyDictionary()


def dashboard_of(bot: Any) -> Dashboard | None:
    """The bot's running dashboard server, if any."""
    return _servers.get(bot)


@hookimpl
async def startup(bot):
    cfg = bot.config.get("dashboard") or {}
    if not cfg.get("enabled"):
        return
    # Here, not at the top: the web app (aiohttp, the training modules) is imported by bots that serve it only.
    from chatcore.dashboard import Dashboard

    server = Dashboard(bot, cfg)  # no admins: a ConfigError that stops the bot with the key to set
    await server.start()
    _servers[bot] = server


@hookimpl
async def shutdown(bot):
    server = _servers.pop(bot, None)
    if server is not None:
        await server.stop()


@hookimpl
def finetune_finished(bot, job, result):
    bot.metrics.finetune_finished(result)


@hookimpl
def feedback_received(bot, exchange, user, value):
    bot.metrics.feedback.labels("good" if value > 0 else "bad").inc()
