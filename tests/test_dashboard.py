"""The dashboard's HTTP side: auth, CSRF, JSON endpoints, audited actions, and /metrics parsed by prometheus_client."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from chatcore.config import ConfigError
from chatcore.dashboard import Dashboard
from chatcore.bot import await_me_maybe
from chatcore.registry import Registry
from chatcore.testing import make_bot

from .dashboard_fixtures import PASSWORD, dashboard_bot


@pytest.fixture
async def dash(tmp_path):
    bot = dashboard_bot(tmp_path, metrics_token=None)
    server = Dashboard(bot, bot.config["dashboard"])
    client = TestClient(TestServer(server.app))
    await client.start_server()
    yield bot, server, client
    await client.close()
    await bot.close()


async def login(client, name="alice", password=PASSWORD):
    r = await client.post("/login", data={"name": name, "password": password}, allow_redirects=False)
    return r


async def session(client) -> str:
    r = await login(client)
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return (await (await client.get("/api/session")).json())["csrf"]


async def test_nothing_without_a_session(dash):
    bot, server, client = dash
    for path in ("/api/overview", "/api/learning", "/api/conversations", "/api/settings", "/api/audit",
                 "/api/session"):
        r = await client.get(path)
        assert r.status == 401, path
        assert "hello" not in await r.text()
    r = await client.post("/api/actions/rollback", json={"confirm": True})
    assert r.status == 401
    assert Registry(server.models_dir).history()["serving"].endswith("000002.safetensors")
    page = await (await client.get("/")).text()
    assert "hello" not in page and "<form" in page  # the shell only: a login form, no data


async def test_wrong_password_and_unknown_name_are_refused(dash):
    bot, server, client = dash
    for name, pw in (("alice", "nope"), ("mallory", PASSWORD), ("alice", "")):
        r = await login(client, name, pw)
        assert r.status == 303 and "failed" in r.headers["Location"]
        assert (await client.get("/api/overview")).status == 401


async def test_repeated_failed_logins_are_throttled(dash):
    bot, server, client = dash
    for _ in range(5):
        await login(client, "alice", "nope")
    assert (await login(client)).status == 429


async def test_behind_a_trusted_proxy_one_clients_failed_logins_do_not_lock_out_the_others(tmp_path):
    bot = dashboard_bot(tmp_path, metrics_token=None)
    server = Dashboard(bot, {**bot.config["dashboard"], "trusted_proxies": ["127.0.0.1"]})
    client = TestClient(TestServer(server.app))
    await client.start_server()
    try:
        attacker, admin = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "198.51.100.4"}
        for _ in range(5):
            await client.post("/login", data={"name": "alice", "password": "nope"}, headers=attacker,
                              allow_redirects=False)
        r = await client.post("/login", data={"name": "alice", "password": PASSWORD}, headers=attacker,
                              allow_redirects=False)
        assert r.status == 429
        r = await client.post("/login", data={"name": "alice", "password": PASSWORD}, headers=admin,
                              allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"
        audit = [json.loads(line) for line in server.audit_path.read_text().splitlines()]
        assert audit[-1]["action"] == "login" and audit[-1]["remote"] == "198.51.100.4"
    finally:
        await client.close()
        await bot.close()


def test_a_bad_dashboard_trusted_proxy_names_the_key(tmp_path):
    bot = dashboard_bot(tmp_path, metrics_token=None)
    try:
        with pytest.raises(ConfigError, match="dashboard.trusted_proxies: 'proxy' is not an IP address"):
            Dashboard(bot, {**bot.config["dashboard"], "trusted_proxies": ["proxy"]})
    finally:
        import asyncio
        asyncio.run(bot.close())


async def test_actions_need_the_csrf_token_and_a_confirmation(dash):
    bot, server, client = dash
    csrf = await session(client)
    before = Registry(server.models_dir).history()["serving"]
    r = await client.post("/api/actions/rollback", json={"confirm": True})
    assert r.status == 403
    r = await client.post("/api/actions/rollback", json={"confirm": True},
                          headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status == 403
    r = await client.post("/api/actions/rollback", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status == 400
    r = await client.post("/api/actions/rollback", json={}, headers={"X-CSRF-Token": csrf, "Origin": "null"})
    assert r.status == 403
    assert Registry(server.models_dir).history()["serving"] == before


async def test_overview_counts_from_the_store(dash):
    bot, server, client = dash
    await session(client)
    d = await (await client.get("/api/overview?days=7")).json()
    assert len(d["days"]) == 7
    assert sum(day["exchanges"] for day in d["days"]) == bot.store.stats()["exchanges"] == 36
    assert [day["exchanges"] for day in d["days"]][:6] == [2, 3, 4, 5, 6, 7]
    assert sum(day["good"] for day in d["days"]) > 0 and sum(day["bad"] for day in d["days"]) > 0
    assert d["serving_model"] == "scripted" and d["serving_checkpoint"].endswith("000002.safetensors")
    assert d["queue"]["busy"] == 0 and d["finetune"] == {"running": False}


async def test_learning_lists_runs_with_curves_gate_and_timeline(dash):
    bot, server, client = dash
    await session(client)
    d = await (await client.get("/api/learning")).json()
    assert [r["status"] for r in d["runs"]] == ["serving", "rejected", "promoted"]
    newest = d["runs"][0]
    assert [p["iter"] for p in newest["history"]] == [0, 10, 20, 30]
    assert newest["data"]["guards"] == {"exact_duplicates": 2, "bad_feedback": 2}
    assert newest["gate"]["reason"] == "beats serving"
    assert [e["event"] for e in d["timeline"]] == ["promoted", "rejected", "promoted"]


async def test_conversations_search_filter_and_forget(dash):
    bot, server, client = dash
    csrf = await session(client)
    d = await (await client.get("/api/conversations?q=SECRET")).json()
    assert [e["user_text"] for e in d["exchanges"]] == ["secret plans"]
    assert {"adapter": "slack", "channel": "ops", "exchanges": 1} in d["channels"]
    d = await (await client.get("/api/conversations?adapter=discord&channel=general&limit=500")).json()
    assert d["exchanges"] and all(e["channel"] == "general" for e in d["exchanges"])
    assert any(e["feedback"] for e in d["exchanges"])
    r = await client.post("/api/actions/forget", json={"confirm": True, "user_key": "slack:bob"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 200, await r.text()
    d = await (await client.get("/api/conversations?q=secret")).json()
    assert d["exchanges"] == []  # /forget semantics: gone from the store, so gone from the dashboard
    assert bot.store.is_opted_out("slack:bob")


async def test_rollback_and_promote_change_the_registry_hot_swap_and_are_audited(dash):
    bot, server, client = dash
    csrf = await session(client)
    models = server.models_dir
    # behind a TLS proxy: the browser's Origin says https, this server sees http on the same host
    origin = f"https://{client.server.host}:{client.server.port}"
    r = await client.post("/api/actions/rollback", json={"confirm": True},
                          headers={"X-CSRF-Token": csrf, "Origin": origin})
    assert r.status == 200, await r.text()
    assert Registry(models).history()["serving"] == "finetuned_20260101_000000.safetensors"
    assert bot.engine.meta["source"].endswith("finetuned_20260101_000000.safetensors")  # hot-swapped
    r = await client.post("/api/actions/promote", json={"confirm": True, "name": "finetuned_20260101_000001.safetensors"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 200, await r.text()
    assert Registry(models).history()["serving"] == "finetuned_20260101_000001.safetensors"
    r = await client.post("/api/actions/promote", json={"confirm": True, "name": "../registry.json"},
                          headers={"X-CSRF-Token": csrf})
    assert r.status == 409
    r = await client.post("/api/actions/finetune/cancel", json={"confirm": True}, headers={"X-CSRF-Token": csrf})
    assert r.status == 409  # nothing runs
    entries = (await (await client.get("/api/audit")).json())["entries"]
    assert [(e["action"], e["ok"], e["who"]) for e in entries[:4]] == [
        ("finetune/cancel", False, "alice"), ("promote", False, "alice"), ("promote", True, "alice"),
        ("rollback", True, "alice")]
    lines = server.audit_path.read_text().splitlines()
    assert json.loads(lines[0])["action"] == "login"


async def test_settings_redact_secrets(dash):
    bot, server, client = dash
    await session(client)
    text = await (await client.get("/api/settings")).text()
    assert PASSWORD not in text
    assert json.loads(text)["config"]["dashboard"]["admins"] == "***"


async def test_metrics_are_prometheus_text_with_requests_latency_and_gate(tmp_path):
    bot = dashboard_bot(tmp_path, metrics_token="${METRICS_TOKEN:-scrape-me}")
    try:
        for text in ("hi", "how are you", "/status"):
            await bot.handle(bot_message(text))
        await bot.rate(bot.store.last_exchange(bot_message("x")), "test:alice", -1)
        bot.pm.hook.finetune_finished(bot=bot, job=None, result={
            "status": "rejected", "gate": {"candidate_val_loss": 3.5, "serving_val_loss": 3.25, "promoted": False}})
        server = Dashboard(bot, bot.config["dashboard"])
        async with TestClient(TestServer(server.app)) as client:
            assert (await client.get("/metrics")).status == 401
            r = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    finally:
        await bot.close()

    def value(family, sample_name=None, **labels):
        return sum(s.value for s in families[family].samples
                   if (sample_name is None or s.name == sample_name)
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("chatcore_requests", "chatcore_requests_total", adapter="test", outcome="answered") == 2
    assert value("chatcore_requests", "chatcore_requests_total", adapter="test", outcome="hook") == 1
    assert value("chatcore_request_seconds", "chatcore_request_seconds_count", adapter="test") == 2
    assert value("chatcore_time_to_first_token_seconds", "chatcore_time_to_first_token_seconds_count") == 2
    assert value("chatcore_generated_tokens") > 0
    assert value("chatcore_finetune_runs", "chatcore_finetune_runs_total", outcome="rejected") == 1
    assert value("chatcore_gate_last_val_loss", model="candidate") == 3.5
    assert value("chatcore_feedback", "chatcore_feedback_total", value="bad") == 1
    assert value("chatcore_serving_model", model_id="scripted") == 1
    for name in ("chatcore_queue_depth", "chatcore_batch_size", "chatcore_busy_answers",
                 "chatcore_prefix_cache_hits", "chatcore_uptime_seconds", "chatcore_decode_threads",
                 "chatcore_decode_thread_switches"):
        assert name in families


def bot_message(text):
    from chatcore.message import Message

    return Message(text=text, adapter="test", channel="general", user="alice", is_direct=True)


async def test_two_bots_keep_separate_metrics(tmp_path):
    a, b = make_bot(tmp_path / "a"), make_bot(tmp_path / "b")
    try:
        await a.handle(bot_message("hi"))
        assert b"chatcore_requests_total" not in b.metrics.render() or \
            b'outcome="answered"' not in b.metrics.render()
        assert b'outcome="answered"' in a.metrics.render()
    finally:
        await a.close()
        await b.close()


def test_enabled_without_admins_is_a_clear_error(tmp_path):
    bot = make_bot(tmp_path, config={"dashboard": {"enabled": True}})
    try:
        with pytest.raises(ConfigError, match="dashboard.admins"):
            Dashboard(bot, bot.config["dashboard"])
    finally:
        import asyncio

        asyncio.run(bot.close())


async def test_the_plugin_serves_the_dashboard_from_startup_to_shutdown(tmp_path):
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bot = dashboard_bot(tmp_path, port=port)
    try:
        for r in bot.pm.hook.startup(bot=bot):
            await await_me_maybe(r)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with http.get(f"http://127.0.0.1:{port}/api/overview") as r:
                assert r.status == 401
        for r in bot.pm.hook.shutdown(bot=bot):
            await await_me_maybe(r)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as http:
                await http.get(f"http://127.0.0.1:{port}/health")
    finally:
        await bot.close()


async def test_off_by_default(tmp_path):
    bot = make_bot(tmp_path)
    try:
        assert bot.config["dashboard"]["enabled"] is False and bot.config["dashboard"]["host"] == "127.0.0.1"
        for r in bot.pm.hook.startup(bot=bot):
            await await_me_maybe(r)
        from chatcore.plugins import dashboard as plugin

        assert plugin.dashboard_of(bot) is None
    finally:
        await bot.close()


async def test_a_full_queue_counts_as_busy(tmp_path):
    from chatcore.serving import Busy

    bot = make_bot(tmp_path, config={"serving": {"max_queue": 0}})
    try:
        with pytest.raises(Busy):
            await bot.handle(bot_message("hi"))
        families = {f.name: f for f in text_string_to_metric_families(bot.metrics.render().decode())}
        assert families["chatcore_busy_answers"].samples[0].value == 1
        busy = [s for s in families["chatcore_requests"].samples if s.labels.get("outcome") == "busy"]
        assert busy and busy[0].value == 1
    finally:
        await bot.close()


async def test_logout_ends_the_session(dash):
    bot, server, client = dash
    csrf = await session(client)
    assert (await client.post("/logout", headers={"X-CSRF-Token": csrf})).status == 200
    assert (await client.get("/api/overview")).status == 401


async def test_starting_a_fine_tune_reuses_the_plugin_and_reports_why_not(tmp_path):
    # no base weights on disk (no checkpoint, a model name in no cache, no starter): the plugin's own refusal
    bot = make_bot(tmp_path, environ={"DASH_PW": PASSWORD}, config={
        "model": {"base": "no-such-model-anywhere", "starter": False},
        "dashboard": {"enabled": True, "admins": {"alice": "${DASH_PW}"}}})
    try:
        async with TestClient(TestServer(Dashboard(bot, bot.config["dashboard"]).app)) as client:
            csrf = await session(client)
            r = await client.post("/api/actions/finetune/start", json={"confirm": True},
                                  headers={"X-CSRF-Token": csrf})
            assert r.status == 409
            assert "no checkpoint" in (await r.json())["error"]
            entries = (await (await client.get("/api/audit")).json())["entries"]
            assert entries[0]["action"] == "finetune/start" and entries[0]["ok"] is False
    finally:
        await bot.close()


@pytest.mark.slow  # a real worker process, cancelled right after it starts
async def test_start_and_cancel_a_fine_tune_from_the_dashboard(tmp_path, sample_conversations):
    import asyncio

    from chatcore import checkpoint
    from chatcore.plugins import auto_finetune
    from chatcore.testing import ScriptedEngine

    from .engine_fixtures import tiny_model

    from chatcore.store import Store

    base = checkpoint.save(tiny_model(), tmp_path / "base", base_model="tiny")
    with Store(tmp_path / "history.db") as store:  # enough data that the job trains until cancelled
        store.import_jsonl(sample_conversations)
    engine = ScriptedEngine()
    engine.meta = {"source": str(base)}  # what Engine.meta carries for a loaded checkpoint
    bot = make_bot(tmp_path, engine=engine, environ={"DASH_PW": PASSWORD}, config={
        "dashboard": {"enabled": True, "admins": {"alice": "${DASH_PW}"}},
        "model": {"checkpoint": str(base), "device": "cpu", "threads": 1},
        "plugins": {"auto_finetune": {"threads": 1, "training": {"max_iters": 2000, "eval_interval": 1000}}}})
    try:
        server = Dashboard(bot, bot.config["dashboard"])
        async with TestClient(TestServer(server.app)) as client:
            csrf = await session(client)
            headers = {"X-CSRF-Token": csrf}
            r = await client.post("/api/actions/finetune/start", json={"confirm": True}, headers=headers)
            assert r.status == 200, await r.text()
            st = auto_finetune.state_of(bot)
            assert st.running and (await (await client.get("/api/overview")).json())["finetune"]["running"]
            r = await client.post("/api/actions/finetune/start", json={"confirm": True}, headers=headers)
            assert r.status == 409  # one at a time: the plugin's Busy
            r = await client.post("/api/actions/finetune/cancel", json={"confirm": True}, headers=headers)
            assert r.status == 200, await r.text()
            result = await asyncio.wait_for(st.task, 120)
            assert result["status"] in ("cancelled", "failed")  # killed before or during training
            assert Registry(tmp_path / "models").history()["serving"] is None  # nothing promoted
            families = {f.name: f for f in text_string_to_metric_families((await (await client.get("/metrics")).text()))}
            assert sum(s.value for s in families["chatcore_finetune_runs"].samples if s.name.endswith("_total")) == 1
    finally:
        await bot.close()


def test_the_page_loads_nothing_from_elsewhere():
    """Offline by construction: every script and stylesheet is served by the dashboard itself."""
    import re

    from chatcore.dashboard.app import STATIC

    page = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    assert all((STATIC / r.removeprefix("/static/")).is_file() for r in refs)
    assert "MIT License" in (STATIC / "uPlot.iife.min.js").read_text().splitlines()[0]
    assert not re.search(r"fetch\(\s*['\"]https?:", (STATIC / "app.js").read_text())


async def test_conversations_page_backwards_with_before(dash):
    bot, server, client = dash
    await session(client)
    first = (await (await client.get("/api/conversations?limit=10")).json())["exchanges"]
    more = (await (await client.get(f"/api/conversations?limit=10&before={first[-1]['id']}")).json())["exchanges"]
    ids = [e["id"] for e in first + more]
    assert len(ids) == 20 and ids == sorted(ids, reverse=True) and len(set(ids)) == 20
    assert (await client.get("/api/conversations?before=soon")).status == 400
