"""The dashboard's aiohttp app: login, JSON endpoints, confirmed and audited actions, /metrics.

It runs on its own port (default 127.0.0.1:8090), apart from the public chat API
of the http adapter: admin pages and chat clients never share a listener, an
API key or a bind address. The page itself (static/) holds no data; everything
comes from the JSON endpoints below, which answer 401 without a session.

Auth: ``dashboard.admins`` maps names to passwords or tokens from the
environment (``alice: ${DASHBOARD_ALICE}``). A login sets an HttpOnly,
SameSite=Strict session cookie; every POST also needs the session's CSRF token
in ``X-CSRF-Token`` and, when the browser sends one, a same-origin ``Origin``.
Actions reuse what the CLI and the auto_finetune plugin use (the registry, the
job starter, the store's forget) and each lands in ``<data_dir>/dashboard_audit.jsonl``
with who did it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ..adapter import client_address, trusted_networks
from ..config import ConfigError
from ..lineage import HoldsForgottenData, check_serve
from ..metrics import CONTENT_TYPE
from ..registry import CANDIDATE_PREFIX, Registry, RegistryError
from ..store import is_postgres_url

log = logging.getLogger("chatcore.dashboard")

STATIC = Path(__file__).with_name("static")
COOKIE = "chatcore_dashboard"
PUBLIC = ("/", "/login", "/health", "/metrics", "/favicon.ico")
LOGIN_ATTEMPTS = 5  # failed logins per address per LOGIN_WINDOW before answering 429
LOGIN_WINDOW = 300.0


class Session:
    def __init__(self, user: str, hours: float) -> None:
        self.user = user
        self.csrf = secrets.token_urlsafe(32)
        self.expires = time.time() + hours * 3600


# aiohttp >= 3.12 wants typed request keys; older ones take a string.
SESSION: Any = web.RequestKey("session", Session) if hasattr(web, "RequestKey") else "session"


class Dashboard:
    """One bot's dashboard server (`start`/`stop`), or its `app` for tests."""

    def __init__(self, bot: Any, config: dict[str, Any]) -> None:
        self.bot = bot
        self.config = config
        self.admins: dict[str, str] = {str(k): str(v) for k, v in (config.get("admins") or {}).items() if v}
        if not self.admins:
            raise ConfigError("the dashboard needs at least one admin with a password from the environment, "
                              "e.g. `admins: {alice: ${DASHBOARD_PASSWORD}}`", key="dashboard.admins",
                              file=bot.config.path)
        self.trusted_proxies = trusted_networks(config.get("trusted_proxies") or [], "dashboard.trusted_proxies")
        self.sessions: dict[str, Session] = {}
        self.failures: dict[str, deque[float]] = {}
        self.models_dir = Path(bot.config.data_dir) / "models"
        self.audit_path = Path(bot.config.data_dir) / "dashboard_audit.jsonl"
        self.runner: web.AppRunner | None = None
        self.app = self.make_app()

    # --- server ------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers, self._auth], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.index)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/health", self.health)
        r.add_get("/favicon.ico", self.favicon)
        if self.config.get("metrics", True):
            r.add_get("/metrics", self.metrics)
        r.add_static("/static/", STATIC)
        r.add_get("/api/session", self.session_info)
        r.add_get("/api/overview", self.overview)
        r.add_get("/api/learning", self.learning)
        r.add_get("/api/conversations", self.conversations)
        r.add_get("/api/settings", self.settings)
        r.add_get("/api/audit", self.audit)
        for name, handler in (("promote", self.do_promote), ("rollback", self.do_rollback),
                              ("finetune/start", self.do_finetune_start),
                              ("finetune/cancel", self.do_finetune_cancel), ("forget", self.do_forget)):
            r.add_post(f"/api/actions/{name}", self._action(name, handler))
        return app

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        host, port = self.config.get("host", "127.0.0.1"), int(self.config.get("port", 8090))
        await web.TCPSite(self.runner, host, port).start()
        log.info("dashboard on http://%s:%d/", host, self.port or port)

    @property
    def port(self) -> int | None:
        """The bound port (useful with port 0)."""
        if self.runner is None:
            return None
        for site in self.runner.sites:
            server = getattr(site, "_server", None)  # aiohttp exposes no public accessor for it
            if server is not None and server.sockets:
                return server.sockets[0].getsockname()[1]
        return None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # --- middlewares ---------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'self' "
                                    "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # not no-referrer: with it Chromium sends "Origin: null" on form posts, which the origin check refuses
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and not self._same_origin(request):
            return _error(403, "cross-origin request refused")
        if request.path in PUBLIC or request.path.startswith("/static/"):
            return await handler(request)
        session = self._session(request)
        if session is None:
            return _error(401, "login required")
        if request.method == "POST" and not hmac.compare_digest(request.headers.get("X-CSRF-Token", ""),
                                                                session.csrf):
            return _error(403, "missing or wrong CSRF token")
        request[SESSION] = session
        return await handler(request)

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        # host only, not scheme: behind a TLS proxy the browser says https while this server sees http
        return origin is None or urlsplit(origin).netloc == request.host

    def _session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        session = self.sessions.get(token)
        if session is not None and session.expires < time.time():
            del self.sessions[token]
            return None
        return session

    # --- pages and login -------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def _remote(self, request: web.Request) -> str:
        """The client's address (behind `dashboard.trusted_proxies`, from X-Forwarded-For): failed logins count by it."""
        return client_address(request.remote, request.headers.getall("X-Forwarded-For", []), self.trusted_proxies)

    async def login(self, request: web.Request) -> web.StreamResponse:
        remote = self._remote(request)
        now = time.time()
        recent = self.failures.setdefault(remote, deque())
        while recent and recent[0] < now - LOGIN_WINDOW:
            recent.popleft()
        if len(recent) >= LOGIN_ATTEMPTS:
            return _error(429, "too many failed logins; wait a few minutes")
        form = await request.post()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        expected = self.admins.get(name, "")
        # compare against something even for an unknown name, so timing does not reveal names
        ok = hmac.compare_digest(password.encode(), (expected or secrets.token_hex(16)).encode()) and bool(expected)
        if not ok:
            recent.append(now)
            log.warning("dashboard: failed login for %r from %s", name[:40], remote)
            raise web.HTTPSeeOther("/?failed=1")
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(name, float(self.config.get("session_hours", 12)))
        self._audit(name, remote, "login", None, True, "")
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                            secure=bool(self.config.get("secure_cookie", False)),
                            max_age=int(float(self.config.get("session_hours", 12)) * 3600))
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)  # none; answering spares the log a 401 per page view

    async def health(self, request: web.Request) -> web.Response:
        """The bot's own health (as the http adapter's /health): 503 when the model worker is stuck."""
        health = self.bot.health()
        return web.json_response(health, status=200 if health["status"] == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        token = self.config.get("metrics_token")
        if token and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {token}"):
            return _error(401, "metrics need the bearer token (dashboard.metrics_token)")
        return web.Response(body=self.bot.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def session_info(self, request: web.Request) -> web.Response:
        session: Session = request[SESSION]
        return web.json_response({"user": session.user, "csrf": session.csrf, "bot": self.bot.name})

    # --- data --------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        bot = self.bot
        days = _int(request.query.get("days"), 30, 1, 366)
        stats = await bot.store.run(bot.store.stats)
        activity = await bot.store.run(bot.store.daily_activity, days)
        job = self._job()
        return web.json_response({
            "bot": bot.name,
            "serving_model": bot.engine.model_id,
            "serving_checkpoint": self._serving_name(),
            "uptime_seconds": round(time.time() - bot.metrics.started, 1),
            "totals": {k: stats[k] for k in ("exchanges", "conversations", "users", "opted_out",
                                             "feedback_votes", "since_finetune")},
            "days": activity,
            "queue": bot.generator.stats(),
            "latency": bot.metrics.summary(),
            "finetune": job,
        })

    async def learning(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await asyncio.to_thread(self._learning))
        except RegistryError as exc:  # a damaged registry.json: say so, the rest of the dashboard works
            return _error(503, str(exc))

    def _learning(self) -> dict[str, Any]:
        reg = self._registry().history()
        status: dict[str, str] = {}
        gate: dict[str, dict] = {}
        timeline = []
        for e in reg["rejected"]:
            status[e["name"]] = "rolled back" if e.get("rolled_back_at") else "rejected"
            gate.setdefault(e["name"], e.get("metrics") or {})
            timeline.append({"at": e["at"], "event": "promoted" if e.get("rolled_back_at") else "rejected",
                             "name": e["name"]})
            if e.get("rolled_back_at"):
                timeline.append({"at": e["rolled_back_at"], "event": "rolled back", "name": e["name"]})
        for e in reg["promoted"]:
            status[e["name"]] = "promoted"
            gate[e["name"]] = e.get("metrics") or gate.get(e["name"], {})
            timeline.append({"at": e["at"], "event": "promoted", "name": e["name"]})
        if reg["serving"]:
            status[reg["serving"]] = "serving"
        runs = []
        for side in sorted(self.models_dir.glob(CANDIDATE_PREFIX + "*.json")):
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                runs.append({"name": side.stem + ".safetensors", "error": f"unreadable sidecar: {exc}"})
                continue
            prov = meta.get("provenance") or {}
            name = side.stem + ".safetensors"
            data = prov.get("data") or {}
            runs.append({
                "name": name,
                "on_disk": side.with_suffix(".safetensors").is_file(),
                "status": status.get(name, "unregistered"),
                "created_at": prov.get("created_at"),
                "base_model": prov.get("base_model"),
                "iteration": prov.get("iteration"),
                "initial_val_loss": prov.get("initial_val_loss"),
                "val_loss": prov.get("val_loss"),
                "train_loss": prov.get("train_loss"),
                "stopped": prov.get("stopped"),
                "data": {k: data.get(k) for k in ("train_exchanges", "val_exchanges", "train_tokens",
                                                  "val_tokens", "guards")},
                "history": prov.get("history") or [],
                "gate": gate.get(name, {}),
                "lineage": prov.get("lineage") or meta.get("lineage"),
            })
        runs.reverse()  # newest first
        timeline.sort(key=lambda e: e["at"])
        return {"serving": reg["serving"], "runs": runs, "timeline": timeline, "finetune": self._job()}

    async def conversations(self, request: web.Request) -> web.Response:
        q = request.query
        rows = await self.bot.store.run(
            self.bot.store.search_exchanges, q.get("q", "")[:200], adapter=q.get("adapter") or None,
            channel=q.get("channel") or None, user_key=q.get("user") or None,
            before_id=_int(q.get("before"), None, 1, None), limit=_int(q.get("limit"), 50, 1, 500))
        channels = await self.bot.store.run(self.bot.store.channels)
        return web.json_response({
            "exchanges": [{"id": e.id, "adapter": e.adapter, "channel": e.channel, "user_key": e.user_key,
                           "user_text": e.user_text, "reply_text": e.reply_text, "created_at": e.created_at,
                           "model_id": e.model_id, "feedback": e.feedback} for e in rows],
            "channels": channels,
        })

    async def settings(self, request: web.Request) -> web.Response:
        return web.json_response({"config": self.bot.config.redacted(), "file": self.bot.config.path})

    async def audit(self, request: web.Request) -> web.Response:
        try:
            lines = self.audit_path.read_text(encoding="utf-8").splitlines()[-200:]
        except FileNotFoundError:
            lines = []
        entries = []
        for line in reversed(lines):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return web.json_response({"entries": entries})

    # --- actions -------------------------------------------------------------------------

    def _action(self, name: str, handler: Any) -> Any:
        async def run(request: web.Request) -> web.Response:
            session: Session = request[SESSION]
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict) or body.get("confirm") is not True:
                return _error(400, 'actions need a JSON body with "confirm": true')
            target = body.get("name") or body.get("user_key")
            try:
                detail = await handler(body)
            except HoldsForgottenData as exc:  # the page may ask again, with "allow_forgotten": true
                self._audit(session.user, self._remote(request), name, target, False, str(exc))
                return web.json_response({"error": str(exc), "forgotten_users": exc.users}, status=409)
            except (ActionRefused, RegistryError) as exc:
                self._audit(session.user, self._remote(request), name, target, False, str(exc))
                return _error(409, str(exc))
            if body.get("allow_forgotten") is True:
                detail += " (with allow_forgotten: true)"
            self._audit(session.user, self._remote(request), name, target, True, detail)
            return web.json_response({"ok": True, "detail": detail})
        return run

    async def do_rollback(self, body: dict[str, Any]) -> str:
        check = await self._forgotten_check(body)
        try:
            serving = await asyncio.to_thread(self._registry().rollback, check)
        except LookupError as exc:
            raise ActionRefused(str(exc)) from None
        return await self._serve(serving)

    async def do_promote(self, body: dict[str, Any]) -> str:
        name = str(body.get("name") or "")
        registry = self._registry()
        kept = {e["name"]: e for e in registry.history()["rejected"]}
        if name not in kept:
            raise ActionRefused(f"{name!r} is not a kept candidate (only rejected or rolled-back "
                                "fine-tunes can be promoted)")
        path = self.models_dir / name
        if not path.is_file():
            raise ActionRefused(f"{name} is no longer on disk")
        check = await self._forgotten_check(body)
        await asyncio.to_thread(check, path)
        await asyncio.to_thread(registry.promote, path, kept[name].get("metrics") or {})
        return await self._serve(path)

    async def do_finetune_start(self, body: dict[str, Any]) -> str:
        from ..plugins.auto_finetune import start_job  # what /finetune uses
        from ..training.scheduler import JobBusy

        try:
            job = await start_job(self.bot)
        except JobBusy as exc:
            raise ActionRefused(str(exc)) from None
        except Exception as exc:  # e.g. no checkpoint to start from
            raise ActionRefused(f"not started: {exc}") from None
        return f"fine-tune job {job.id} started"

    async def do_finetune_cancel(self, body: dict[str, Any]) -> str:
        from ..plugins.auto_finetune import state_of

        st = state_of(self.bot)
        if not st.running or st.job is None:
            raise ActionRefused("no fine-tune is running")
        await asyncio.to_thread(st.job.cancel)
        return f"fine-tune job {st.job.id} cancelled"

    async def do_forget(self, body: dict[str, Any]) -> str:
        user_key = str(body.get("user_key") or "")
        if ":" not in user_key:
            raise ActionRefused("user_key must look like adapter:user, e.g. discord:1234")
        deleted = await self.bot.store.run(self.bot.store.forget_user, user_key)
        return f"deleted {deleted} exchange(s) of {user_key}; never trained on again"

    async def _serve(self, checkpoint: Path | None) -> str:
        """Hot-swap the running bot to what the registry now says serves, now rather than at the bot's next
        registry poll: the same `RegistryWatch` step, fully loaded off the event loop, then swapped in.
        Instances sharing a PostgreSQL history are told too (NOTIFY), as after a fine-tune's promotion."""
        bot = self.bot
        if is_postgres_url(bot.config.store_url):
            from ..postgres import announce_registry_change

            await asyncio.to_thread(announce_registry_change, bot.config.store_url,
                                    checkpoint.name if checkpoint else "base")
        try:
            engine = await asyncio.to_thread(bot.registry_watch.engine_if_needed, bot.generator.engine)
        except Exception as exc:  # the registry changed; the running model keeps answering
            log.error("dashboard: loading %s failed: %s", checkpoint or "the base model", exc)
            return (f"the registry now serves {checkpoint.name if checkpoint else 'the base model'}, but loading "
                    f"it failed ({exc}); still serving {bot.engine.model_id}")
        if engine is not None:
            bot.generator.swap(engine)
        return f"now serving {bot.engine.model_id}"

    # --- helpers -----------------------------------------------------------------------

    async def _forgotten_check(self, body: dict[str, Any]) -> Any:
        """`lineage.check_serve` for a checkpoint about to serve again; `"allow_forgotten": true` overrides it."""
        store = self.bot.store
        excluded, forgotten = await store.run(store.excluded_users), await store.run(store.forgotten)
        force = body.get("allow_forgotten") is True
        return lambda target: check_serve(target, excluded, forgotten, force=force,
                                          override='"allow_forgotten": true')

    def _registry(self) -> Registry:
        gate = self.bot.config.get("plugins.auto_finetune.gate") or {}
        return Registry(self.models_dir, keep=gate.get("keep") or 3, keep_rejected=gate.get("keep_rejected") or 3)

    def _serving_name(self) -> str | None:
        try:
            return self._registry().history()["serving"]
        except RegistryError as exc:
            return f"unknown: {exc}"

    def _job(self) -> dict[str, Any]:
        from ..plugins.auto_finetune import state_of

        st = state_of(self.bot)
        if not st.running or st.job is None:
            return {"running": False}
        return {"running": True, "job": st.job.id, "progress": st.job.progress()}

    def _audit(self, who: str, remote: str | None, action: str, target: Any, ok: bool, detail: str) -> None:
        entry = {"at": time.time(), "who": who, "remote": remote, "action": action, "target": target,
                 "ok": ok, "detail": detail}
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("dashboard: %s by %s: %s", action, who, detail)


class ActionRefused(Exception):
    """An action that cannot be done now (answered 409 and audited)."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int(value: str | None, default: int | None, low: int, high: int | None) -> int | None:
    try:
        n = int(value) if value not in (None, "") else default
    except ValueError:
        raise web.HTTPBadRequest(text=f"not a number: {value!r}") from None
    if n is None:
        return None
    return max(low, n if high is None else min(high, n))
