"""The HTTP edge under hostile or unlucky requests (issue 17 items 1, 10-13; issue 9 defect 3)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from chatcore import hookimpl

from .conftest import eventually

KEY = "test-api-key"
USER_MESSAGE = [{"role": "user", "content": "hi"}]


def client(base_url: str, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=10)


async def send(url: str, data: bytes | str | dict | list, *, headers: dict | None = None,
               method: str = "POST") -> tuple[int, dict, dict]:
    body = data if isinstance(data, (bytes, str)) else json.dumps(data)
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=body, headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else {}), dict(r.headers)


class Recorder:
    """Records every message the core receives (to check what the adapter said about its sender)."""

    def __init__(self) -> None:
        self.messages = []

    @hookimpl
    def message_received(self, bot, message):
        self.messages.append(message)


# --- item 1: a seed past torch's range, and every other sampler field ------------------------


@pytest.mark.parametrize("seed", [18446744073709551616, -(2**63) - 1, 10**30])
async def test_a_huge_seed_is_a_400_and_serving_goes_on(http_bot, seed):
    _, _, url = await http_bot()
    async with client(url) as api:
        with pytest.raises(openai.BadRequestError) as info:
            await api.chat.completions.create(model="x", messages=USER_MESSAGE, seed=seed)
        assert info.value.body["param"] == "seed"
        ok = await api.chat.completions.create(model="x", messages=USER_MESSAGE, seed=2**64 - 1)
    assert ok.choices[0].message.content == "You said: hi"


@pytest.mark.parametrize("field, value", [
    ("seed", 1.5), ("seed", "7"), ("seed", True), ("temperature", "hot"), ("temperature", [1]),
    ("top_p", 2), ("top_p", -0.5), ("top_k", 0), ("top_k", "5"), ("top_k", 2**70), ("max_tokens", 2**70),
    ("max_tokens", 1.0), ("stop", 5), ("stop", [""]), ("stop", [1]), ("n", "1"), ("n", True), ("n", 2**70),
    ("stream", "yes"), ("model", 5), ("user", 5), ("user", "u" * 300), ("messages", "hi"),
    ("messages", [None]), ("messages", [{"role": "user"}]), ("messages", [{"role": "wizard", "content": "x"}]),
    ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "user", "content": [5]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": {"text": "hi"}}]),
])
async def test_every_bad_field_is_a_400_in_openai_shape(http_bot, field, value):
    _, _, url = await http_bot()
    body = {"model": "x", "messages": USER_MESSAGE, field: value}
    status, payload, _ = await send(f"{url}/v1/chat/completions", body)
    assert status == 400, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]


# --- item 12: malformed shapes ---------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"seed": ' + b"9" * 5000 + b"}",  # more digits than Python converts
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
    b'{"messages": [{"role": "user", "content": "hi"}]' + b"\xff\xfe",
    b"\xef\xbb\xbf{}",
    b"NaN", b"", b"null",
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat", "/feedback"])
async def test_malformed_bodies_are_400_never_500(http_bot, raw, path):
    _, _, url = await http_bot({"max_request_bytes": 512 * 1024})
    status, payload, _ = await send(f"{url}{path}", raw)
    assert status == 400 and payload["error"]["type"] == "invalid_request_error", payload
    status, _, _ = await send(f"{url}/chat", {"message": "still alive?"})
    assert status == 200


async def test_a_long_conversation_header_is_a_400(http_bot):
    _, _, url = await http_bot()
    status, payload, _ = await send(f"{url}/chat", {"message": "hi"}, headers={"X-Chatcore-Conversation": "c" * 300})
    assert status == 400 and payload["error"]["param"] == "X-Chatcore-Conversation"


# --- item 13 and item 1: /health ------------------------------------------------------------------


async def test_health_shows_no_paths(http_bot):
    bot, _, url = await http_bot(model_id="/home/op/models/base.safetensors (/srv/ckpt/gpt2-base)")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as r:
            assert r.status == 200
            body = await r.json()
    assert body == {"status": "ok", "model": "base.safetensors (gpt2-base)"}
    assert "/" not in json.dumps(body)
    async with client(url) as api:
        assert [m.id for m in (await api.models.list()).data] == ["base.safetensors (gpt2-base)"]


async def test_health_is_503_when_the_engine_is_dead(http_bot):
    bot, _, url = await http_bot()
    bot.generator.health = lambda: "the model worker stopped"  # what a dead worker reports (tested in the core)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as r:
            assert r.status == 503
            assert (await r.json()) == {"status": "unavailable", "reason": "the model worker stopped"}


# --- item 11: cross-site requests and DNS rebinding -------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
async def test_non_json_posts_are_refused_and_not_stored(http_bot, content_type):
    bot, _, url = await http_bot()
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/chat", data=b'{"message": "csrf", "user": "victim"}',
                                headers=headers, skip_auto_headers=["Content-Type"]) as r:
            assert r.status == 415, await r.text()
    assert list(bot.store.exchanges()) == []


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Host": "attacker.example:8080"}, 403),  # DNS rebinding: the page's name, resolving to 127.0.0.1
    ({"Host": "attacker.example", "Origin": "http://attacker.example"}, 403),
    ({"Origin": "https://app.example"}, 200),  # allowed_origins
    ({"Host": "bot.internal:9000"}, 200),  # allowed_hosts
    ({"Host": "localhost:1234"}, 200),
    ({"Host": "[::1]:1234"}, 200),
])
async def test_host_and_origin_are_checked(http_bot, headers, status):
    bot, _, url = await http_bot({"allowed_origins": ["https://app.example/"], "allowed_hosts": ["bot.internal"]})
    got, payload, _ = await send(f"{url}/chat", {"message": "hi", "user": "u"}, headers=headers)
    assert got == status, payload
    assert len(list(bot.store.exchanges())) == (1 if status == 200 else 0)


async def test_same_origin_and_plain_clients_pass(http_bot):
    _, adapter, url = await http_bot()
    status, _, _ = await send(f"{url}/chat", {"message": "hi"}, headers={"Origin": url})
    assert status == 200


# --- item 10 and issue 9 defect 3: identity and rate limits ---------------------------------------


async def test_rotating_user_does_not_escape_the_rate_limit(http_bot):
    bot, _, url = await http_bot(config={"plugins": {"commands": {"rate_limit": {"messages": 3, "seconds": 600}}}})
    statuses = []
    for i in range(5):
        status, payload, headers = await send(f"{url}/chat", {"message": f"msg {i}", "user": f"sock-{i}"})
        statuses.append(status)
    assert statuses == [200, 200, 200, 429, 429]
    assert int(headers["Retry-After"]) >= 1 and payload["error"]["code"] == "rate_limit_exceeded"
    async with client(url) as api:
        with pytest.raises(openai.RateLimitError) as info:
            await api.chat.completions.create(model="x", messages=USER_MESSAGE, user="yet-another")
        assert int(info.value.response.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):  # streaming too, before any event is sent
            await api.chat.completions.create(model="x", messages=USER_MESSAGE, stream=True)
    assert len(list(bot.store.exchanges())) == 3


async def test_with_an_api_key_users_are_limited_one_by_one(http_bot):
    _, _, url = await http_bot({"api_key": KEY},
                               config={"plugins": {"commands": {"rate_limit": {"messages": 1, "seconds": 600}}}})
    auth = {"Authorization": f"Bearer {KEY}"}
    assert (await send(f"{url}/chat", {"message": "a", "user": "ann"}, headers=auth))[0] == 200
    assert (await send(f"{url}/chat", {"message": "b", "user": "ann"}, headers=auth))[0] == 429
    assert (await send(f"{url}/chat", {"message": "c", "user": "ben"}, headers=auth))[0] == 200


async def test_messages_say_who_vouches_for_the_sender(http_bot):
    recorder = Recorder()
    _, _, url = await http_bot(plugins=[recorder])
    await send(f"{url}/chat", {"message": "named", "user": "nina"})
    await send(f"{url}/chat", {"message": "nameless"})
    named, nameless = recorder.messages
    assert (named.user, named.authenticated, named.anonymous, named.client) == ("nina", False, False, "127.0.0.1")
    assert nameless.anonymous and not nameless.authenticated and nameless.user.startswith("anonymous-")
    assert named.limit_key == nameless.limit_key == "http:client:127.0.0.1"


async def test_behind_a_trusted_proxy_each_client_is_limited_by_its_own_address(http_bot):
    # nginx/Caddy in front: every request comes from the proxy, which appends the client to X-Forwarded-For
    recorder = Recorder()
    bot, _, url = await http_bot({"trusted_proxies": ["127.0.0.0/8"]}, plugins=[recorder],
                                 config={"plugins": {"commands": {"rate_limit": {"messages": 1, "seconds": 600}}}})
    via = lambda chain: {"X-Forwarded-For": chain}  # noqa: E731
    assert (await send(f"{url}/chat", {"message": "a"}, headers=via("203.0.113.7")))[0] == 200
    assert (await send(f"{url}/chat", {"message": "b"}, headers=via("198.51.100.2")))[0] == 200  # another client
    # the same client again, claiming another origin to the left of what the proxy appended: still itself
    assert (await send(f"{url}/chat", {"message": "c"}, headers=via("1.2.3.4, 203.0.113.7")))[0] == 429
    assert [m.client for m in recorder.messages] == ["203.0.113.7", "198.51.100.2"]  # a refused one is not heard
    assert (await send(f"{url}/chat", {"message": "d"}, headers=via("not-an-ip")))[0] == 200  # the proxy's own
    assert recorder.messages[-1].client == "127.0.0.1"


async def test_a_forwarded_for_header_from_an_untrusted_peer_is_ignored(http_bot):
    recorder = Recorder()
    _, _, url = await http_bot({"trusted_proxies": ["10.0.0.0/8"]}, plugins=[recorder],
                               config={"plugins": {"commands": {"rate_limit": {"messages": 1, "seconds": 600}}}})
    assert (await send(f"{url}/chat", {"message": "a"}, headers={"X-Forwarded-For": "203.0.113.7"}))[0] == 200
    assert (await send(f"{url}/chat", {"message": "b"}, headers={"X-Forwarded-For": "198.51.100.2"}))[0] == 429
    assert {m.client for m in recorder.messages} == {"127.0.0.1"}


def test_a_bad_trusted_proxy_is_a_config_error_naming_the_key(tmp_path, capsys):
    from chatcore.cli import main

    config = tmp_path / "bot.yaml"
    config.write_text("adapters:\n  http:\n    enabled: true\n    trusted_proxies: [10.0.0.0/8, nginx]\n")
    assert main(["config", "check", str(config)]) == 2
    assert "adapters.http.trusted_proxies: 'nginx' is not an IP address or network" in capsys.readouterr().err


async def test_with_an_api_key_messages_are_authenticated(http_bot):
    recorder = Recorder()
    _, _, url = await http_bot({"api_key": KEY}, plugins=[recorder])
    await send(f"{url}/chat", {"message": "hi", "user": "nina"}, headers={"Authorization": f"Bearer {KEY}"})
    (message,) = recorder.messages
    assert message.authenticated and not message.anonymous and message.limit_key == "http:nina"


async def test_anonymous_clients_never_share_or_touch_each_others_data(http_bot):
    bot, _, url = await http_bot()
    for path, body in [("/chat", {"message": "secret one"}), ("/chat", {"message": "secret two"})]:
        await send(f"{url}{path}", body, headers={"X-Chatcore-Conversation": "same-name"})
    async with client(url) as api:
        await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "secret three"}])
    prompts = bot.engine.prompts
    assert "secret one" not in prompts[1] and "secret two" not in prompts[2] and "secret one" not in prompts[2]
    users = {e.user for e in list(bot.store.exchanges())}
    assert len(users) == 3 and all(u.startswith("anonymous-") for u in users)
    for command in ("/forget", "/reset", "/good", "/bad"):
        status, body, _ = await send(f"{url}/chat", {"message": command})
        assert status == 200 and "needs to know who you are" in body["response"], command
    assert len(list(bot.store.exchanges())) == 3  # /forget deleted nothing
    status, body, _ = await send(f"{url}/chat", {"message": "/help"})
    assert "/forget" in body["response"]


async def test_a_named_client_keeps_its_conversation_and_can_forget_it(http_bot):
    bot, _, url = await http_bot()
    await send(f"{url}/chat", {"message": "remember the llama", "user": "u1"})
    await send(f"{url}/chat", {"message": "what animal?", "user": "u1"})
    assert "remember the llama" in bot.engine.prompts[-1]
    status, body, _ = await send(f"{url}/chat", {"message": "/forget", "user": "u1"})
    assert "deleted 2" in body["response"]


async def test_feedback_needs_the_user_who_chatted(http_bot):
    bot, _, url = await http_bot()
    async with client(url) as api:
        result = await api.chat.completions.create(model="x", messages=USER_MESSAGE, user="ann")
    status, payload, _ = await send(f"{url}/feedback", {"id": result.id, "value": 1})
    assert status == 400 and payload["error"]["param"] == "user"
    status, _, _ = await send(f"{url}/feedback", {"id": result.id, "value": 1, "user": "ann"})
    assert status == 200
    await eventually(lambda: bot.store.find_by_platform_message_id("http", result.id).feedback == 1)


async def test_a_huge_seed_never_reaches_the_real_batch_worker(tmp_path):
    """The reported crash: the real model behind continuous batching, seed 2**64, then more requests."""
    import torch

    from chatcore.engine import Engine
    from chatcore.model import GPT, GPTConfig
    from chatcore.testing import make_bot
    from chatcore.tokenizer import Tokenizer

    from .conftest import Running

    torch.manual_seed(0)
    engine = Engine(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), Tokenizer(),
                    model_id="tiny", device="cpu", dtype="float32")
    bot = make_bot(tmp_path, engine=engine, config={
        "adapters": {"http": {"enabled": True, "host": "127.0.0.1", "port": 0, "max_tokens": 8}},
        "generation": {"max_new_tokens": 8}})
    adapter = bot.enabled_adapters(["http"])[0]
    running = Running()
    await running.start(bot, adapter, adapter.ready.wait)
    try:
        url = f"http://127.0.0.1:{adapter.port}"
        async with client(url) as api:
            with pytest.raises(openai.BadRequestError):
                await api.chat.completions.create(model="x", messages=USER_MESSAGE, seed=18446744073709551616)
            results = await asyncio.gather(*(api.chat.completions.create(
                model="x", messages=USER_MESSAGE, seed=i, user=f"u{i}") for i in range(3)))
        assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
        assert type(bot.generator.backend).__name__ == "BatchScheduler" and bot.health()["status"] == "ok"
    finally:
        await running.stop_all()
