"""The HTTP adapter: plain HTTP for /chat, the official openai client for the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import aiohttp
import openai
import pytest

from .conftest import FeedbackSpy, eventually

KEY = "test-api-key"


def client(base_url: str, api_key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=10)


async def post(url: str, body, *, key: str | None = KEY, headers: dict | None = None) -> tuple[int, dict, dict]:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=data, headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, await r.json(), dict(r.headers)


async def test_health_and_chat_over_plain_http(http_bot):
    bot, _, url = await http_bot({"api_key": KEY})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as r:  # no key needed
            assert r.status == 200 and (await r.json()) == {"status": "ok", "model": "scripted"}
    status, body, _ = await post(f"{url}/chat", {"message": "hello there"})
    assert (status, body) == (200, {"response": "You said: hello there"})
    status, body, headers = await post(f"{url}/chat", {"message": "hello"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and headers["WWW-Authenticate"] == "Bearer"
    status, _, _ = await post(f"{url}/chat", {"message": "hello"}, key="wrong")
    assert status == 401


async def test_chat_conversations_follow_user_and_conversation(http_bot):
    bot, _, url = await http_bot()
    await post(f"{url}/chat", {"message": "remember the llama", "user": "u1"})
    await post(f"{url}/chat", {"message": "what animal?", "user": "u1"})
    await post(f"{url}/chat", {"message": "and for me?", "user": "u2"})
    await post(f"{url}/chat", {"message": "anonymous one"})
    await post(f"{url}/chat", {"message": "anonymous two"})
    await post(f"{url}/chat", {"message": "other thread", "user": "u1"}, headers={"X-Chatcore-Conversation": "t2"})
    prompts = bot.engine.prompts
    assert "remember the llama" in prompts[1]
    assert "llama" not in prompts[2]
    assert "anonymous one" not in prompts[4]  # no user, no conversation: a one-off
    assert "llama" not in prompts[5]


@pytest.mark.parametrize("body, status, fragment", [
    ({}, 400, "message"),
    ({"message": "   "}, 400, "message"),
    ({"message": 42}, 400, "message"),
    ([1, 2], 400, "JSON object"),
    ("{not json", 400, "not valid JSON"),
    ({"message": "x" * 5000}, 413, "larger than"),
    ({"message": "hi", "user": ["list"]}, 400, "user"),
])
async def test_chat_bad_requests_get_clear_errors(http_bot, body, status, fragment):
    _, _, url = await http_bot({"max_request_bytes": 4096})
    got, payload, _ = await post(f"{url}/chat", body)
    assert got == status and fragment in payload["error"]["message"]


async def test_openai_client_non_streaming(http_bot):
    bot, _, url = await http_bot({"api_key": KEY, "max_tokens": 64})
    async with client(url) as api:
        models = await api.models.list()
        assert [m.id for m in models.data] == ["scripted"]
        result = await api.chat.completions.create(
            model="scripted", user="alice", temperature=0.3, top_p=0.9, seed=7,
            messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "earlier"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi there"}])
    assert result.choices[0].message.content == "You said: hi there"
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "stop"
    assert result.model == "scripted" and result.id.startswith("chatcmpl-")
    assert bot.engine.prompts[-1].endswith("Human: hi there\nAssistant:")  # only the last user message
    exchange = bot.store.find_by_platform_message_id("http", result.id)
    assert exchange.user == "alice"
    assert exchange.params["temperature"] == 0.3 and exchange.params["top_p"] == 0.9
    assert exchange.params["seed"] == 7 and exchange.params["max_new_tokens"] == 64


async def test_openai_client_stop_and_max_tokens_reach_the_sampler(http_bot):
    _, _, url = await http_bot(replies=["one two three four five six seven"])
    async with client(url) as api:
        stopped = await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "go"}],
                                                    stop=["four"])
        short = await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "go"}],
                                                  max_tokens=3)
    assert stopped.choices[0].message.content == "one two three"
    assert short.choices[0].message.content == "one two three"  # the scripted model counts words as tokens


async def test_openai_client_streaming(http_bot):
    bot, _, url = await http_bot({"api_key": KEY}, replies=["a streamed answer in several words"])
    async with client(url) as api:
        stream = await api.chat.completions.create(model="scripted", stream=True,
                                                   messages=[{"role": "user", "content": "stream please"}])
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(deltas) == "a streamed answer in several words"
    assert len(deltas) >= 5  # really streamed, word by word
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1
    assert bot.store.find_by_platform_message_id("http", chunks[0].id).reply_text == "a streamed answer in several words"


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"messages": [{"role": "system", "content": "no user here"}]}, "messages"),
    ({"messages": []}, "messages"),
])
async def test_openai_client_bad_requests_are_400(http_bot, kwargs, param):
    _, _, url = await http_bot({"max_tokens": 256})
    request = {"model": "x", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    async with client(url) as api:
        with pytest.raises(openai.BadRequestError) as info:
            await api.chat.completions.create(**request)
    assert info.value.status_code == 400 and info.value.body["param"] == param


async def test_oversized_request_is_413(http_bot):
    _, _, url = await http_bot({"max_request_bytes": 2048})
    async with client(url) as api:
        with pytest.raises(openai.APIStatusError) as info:
            await api.chat.completions.create(model="x", messages=[{"role": "user", "content": "y" * 4000}])
    assert info.value.status_code == 413


async def test_wrong_key_is_401_for_the_openai_client(http_bot):
    _, _, url = await http_bot({"api_key": KEY})
    async with client(url, api_key="nope") as api:
        with pytest.raises(openai.AuthenticationError):
            await api.models.list()


async def test_concurrent_requests_are_all_answered(http_bot):
    _, _, url = await http_bot(delay=0.002)
    async with client(url) as api:
        async def ask(i: int) -> str:
            if i % 2:
                stream = await api.chat.completions.create(
                    model="x", stream=True, user=f"user{i}", messages=[{"role": "user", "content": f"question {i}"}])
                return "".join([c.choices[0].delta.content or "" async for c in stream])
            result = await api.chat.completions.create(
                model="x", user=f"user{i}", messages=[{"role": "user", "content": f"question {i}"}])
            return result.choices[0].message.content
        answers = await asyncio.gather(*(ask(i) for i in range(12)))
    assert answers == [f"You said: question {i}" for i in range(12)]


async def test_a_full_queue_is_503_with_retry_after(http_bot):
    gate = threading.Event()
    bot, _, url = await http_bot(replies=lambda prompt: "finally" if gate.wait(10) else "gate never opened",
                                 config={"serving": {"max_queue": 1}})
    first = asyncio.create_task(post(f"{url}/chat", {"message": "first"}))
    await eventually(lambda: bot.engine.prompts)  # the model is busy with the first request
    status, body, headers = await post(f"{url}/chat", {"message": "hi"})
    assert status == 503 and body["error"]["code"] == "busy" and headers["Retry-After"] == "1"
    async with client(url) as api:
        with pytest.raises(openai.InternalServerError) as info:
            await api.chat.completions.create(model="x", stream=True, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and "busy" in info.value.message
    gate.set()
    assert (await first)[:2] == (200, {"response": "finally"})


async def test_a_client_leaving_a_stream_stops_the_model(http_bot):
    words = " ".join(f"w{i}" for i in range(200))
    reply = lambda prompt: words if prompt.endswith("long\nAssistant:") else "short answer"  # noqa: E731
    bot, _, url = await http_bot(replies=reply, delay=0.02, config={"generation": {"max_new_tokens": 500}},
                                 settings={"max_tokens": 500})
    body = {"model": "x", "stream": True, "messages": [{"role": "user", "content": "long"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=body) as r:
            await r.content.readline()  # the first event arrived: generation is under way
    # The whole reply would take 4 s; the model stops at its next word and nothing is logged.
    async with client(url) as api:
        result = await asyncio.wait_for(api.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "next"}]), 2)
    assert result.choices[0].message.content == "short answer"
    assert [e.user_text for e in bot.store.exchanges()] == ["next"]


async def test_feedback_endpoint_rates_a_completion(http_bot):
    spy = FeedbackSpy()
    bot, _, url = await http_bot(plugins=[spy])
    async with client(url) as api:
        result = await api.chat.completions.create(model="x", user="alice",
                                                   messages=[{"role": "user", "content": "rate me"}])
    status, body, _ = await post(f"{url}/feedback", {"id": result.id, "value": -1, "user": "alice"})
    assert (status, body) == (200, {"ok": True})
    exchange = bot.store.find_by_platform_message_id("http", result.id)
    assert spy.votes == [(exchange.id, "http:alice", -1)]
    status, body, _ = await post(f"{url}/feedback", {"id": "chatcmpl-unknown", "value": 1, "user": "alice"})
    assert status == 404
    status, _, _ = await post(f"{url}/feedback", {"id": result.id, "value": 5})
    assert status == 400


def test_checking_an_http_config_does_not_import_aiohttp(tmp_path):
    # The schema, its defaults and check_config are read by every start and by `chatcore config check`:
    # aiohttp (~0.2 s) is imported only when the adapter serves.
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\nadapters:\n  http:\n    enabled: true\n"
                      "    api_key: secret\n    trusted_proxies: [10.0.0.0/8]\n")
    probe = ("import sys\nfrom chatcore.cli import main\n"
             "rc = main(['config', 'check', sys.argv[1]]) + main(['config', 'defaults'])\n"
             "print(rc, 'aiohttp' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert "adapters enabled: http" in out.stdout.decode() and "trusted_proxies:" in out.stdout.decode()
    assert out.stderr.decode().split() == ["0", "False"]
