"""The bot runtime: one engine, one store, many adapters, every step a hook.

Adapters see it only through `chatcore.adapter.BotSurface`."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import logging
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from .adapter import AdapterError
from .config import Config, load_config
from .consent import check_config, decide
from .message import DROP, Busy, Message, Reply
from .metrics import Metrics
from .params import SamplingParams
from .plugin_manager import Command, PluginManager, await_me_maybe, call_hook, make_plugin_manager
from .prompt import build_prompt
from .registry import serving_checkpoint
from .scopes import Scopes, adapter_dir
from .serving import Generator
from .store import is_postgres_url
from .weights import RegistryWatch, load_engine, models_dir

log = logging.getLogger("chatcore")

SHUTDOWN_GRACE_S = 10.0
"""On stop, how long adapters get to finish the requests in flight before they are cancelled."""

# an absolute, home or relative file system path inside a model id (a Hugging Face repo id is not one)
_PATH = re.compile(r"(?<![\w.-])(?:[A-Za-z]:[\\/]|~?/|\.{1,2}[\\/])[^\s()]*")


def public_id(model_id: str) -> str:
    """A model id as outsiders may see it: file system paths cut to their last part."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], model_id)


class Bot:
    """Answers messages (`handle`) and runs the adapters; implements `chatcore.adapter.BotSurface`."""

    registry_poll_s = 2.0  # how often a running bot looks for promotions and rollbacks made elsewhere

    def __init__(self, config: Config, pm: PluginManager, store: Any, generator: Generator) -> None:
        self.config = config
        self.pm = pm
        self.store = store
        self.generator = generator
        self.params = SamplingParams(**{**config["generation"], "stop": tuple(config["generation"]["stop"])})
        self.commands: dict[str, Command] = pm.commands()
        self.adapter_classes = pm.adapters()
        self.adapters: list[Any] = []
        self._stopping = asyncio.Event()
        self.registry_watch = RegistryWatch(config)  # from now on, registry changes are followed
        self._registry_listener: Any = None  # LISTENs for promotions announced by other instances
        self.metrics = Metrics(self)  # per bot: tests with many bots never share counters
        self.scopes = Scopes.from_config(config)  # communities: persona and adapter (chatcore/scopes.py)

    # --- building -------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: str | Path | Config | None = None,
        *,
        engine: Any = None,
        plugins: Iterable[Any] = (),
        pm: PluginManager | None = None,
    ) -> "Bot":
        """Load plugins, validate the config against everything they declare, open the store, load the model."""
        from .store import Store

        pm = pm or make_plugin_manager(plugins)
        if not isinstance(config, Config):
            config = load_config(config, pm.schema())
        pm.disable(config["plugins"]["disabled"])
        check_config(config)  # an unacknowledged Discord/Slack training policy stops the bot before it starts
        store = Store(config.store_url, timeout=config["store"]["busy_timeout_s"])  # first: a locked or read-only database fails before the model loads
        serving = config["serving"]
        try:
            if config["model"]["remote"] and engine is None:  # a front end: generation runs on the serving box
                from .remote import RemoteGenerator

                generator: Any = RemoteGenerator.from_config(config)
            else:
                generator = Generator(engine if engine is not None else load_engine(config),
                                      max_queue=serving["max_queue"], max_batch=serving["max_batch"],
                                      prefix_cache_mb=serving["prefix_cache_mb"],
                                      adapt_threads=serving["adapt_threads"])
        except BaseException:
            store.close()
            raise
        return cls(config, pm, store, generator)

    @property
    def name(self) -> str:
        return self.config["bot"]["name"]

    @property
    def engine(self) -> Any:
        return self.generator.engine

    @property
    def public_model_id(self) -> str:
        """The serving model's id as outsiders may see it: no file system paths."""
        return public_id(self.engine.model_id)

    def health(self) -> dict[str, Any]:
        """What a health check needs: ``status`` ("ok" or "unavailable"), the public model id, and why not ok."""
        problem = self.generator.health()
        if problem is not None:
            return {"status": "unavailable", "reason": problem}
        return {"status": "ok", "model": self.public_model_id}

    def is_admin(self, message: Message) -> bool:
        if message.user_key in self.config["bot"]["admins"]:
            return True
        # Whoever types into the bot's own terminal is its operator.
        return bool(self.config.get(f"adapters.{message.adapter}.operator_is_admin", False))

    # --- one message --------------------------------------------------------------

    async def handle(self, message: Message, on_delta: Callable[[str], Any] | None = None,
                     params: SamplingParams | None = None) -> Reply | None:
        """Answer `message` (see `_answer`), counted and timed for /metrics."""
        probe = self.metrics.request(message.adapter)
        try:
            reply = await self._answer(message, probe.wrap(on_delta), params)
        except Busy:
            probe.done("busy")
            raise
        except BaseException:
            probe.done("error")
            raise
        outcome = "silent" if reply is None else "answered" if reply.from_model else "hook"
        probe.done(outcome, reply, self.generator.engine.count_tokens)
        return reply

    async def _answer(self, message: Message, on_delta: Callable[[str], Any] | None = None,
                      params: SamplingParams | None = None) -> Reply | None:
        """Answer `message`: hooks, history, model, store. None means nothing to send.

        `params` replaces the configured sampler settings for this message (per-request API settings).
        """
        params = params or self.params
        if not message.text.strip():
            return None
        answer = await self._first_result("message_received", bot=self, message=message)
        if answer is DROP:
            return None
        if isinstance(answer, Reply) and answer.exchange_id is not None:
            return answer  # already generated and logged (e.g. /retry)
        if answer is not None:
            # A command may answer with a whole Reply (e.g. /mydata, which carries a file).
            reply = answer if isinstance(answer, Reply) else Reply(text=str(answer), message=message, from_model=False)
            await self._call("reply_ready", bot=self, message=message, reply=reply)
            return reply if reply.text else None

        # Every store call runs on the store's thread: a locked database delays this chat, not the loop.
        history = await self.store.run(self.store.history, message, limit=self.config["bot"]["history_turns"])
        return await self._generate(message, history, params, on_delta)

    async def complete(self, prompt: str, params: SamplingParams, info: dict[str, Any] | None = None,
                       scope: str | None = None) -> AsyncIterator[str]:
        """Generate after `prompt` exactly as given (no hooks, history or store): a front end
        (`chatcore.remote`) rendered it and keeps those; `scope` (its name) adds that scope's adapter here.
        `info["model"]`: the public id of the weights that answered."""
        answered: dict[str, Any] = {}
        adapter = self.scope_adapter(self.scopes.by_name.get(scope)) if scope else None
        probe = self.metrics.request("front_ends")  # counted and timed for /metrics like the bot's own messages
        noted, parts = probe.wrap(None), []
        try:
            async with aclosing(self.generator.stream(prompt, params, adapter, answered)) as stream:
                async for delta in stream:
                    noted(delta)
                    parts.append(delta)
                    if info is not None:
                        info["model"] = public_id(answered.get("model_id", self.engine.model_id))
                    yield delta
        except BaseException as exc:
            probe.done("busy" if isinstance(exc, Busy) else "error")
            raise
        # no Message here: the front end holds it (the probe reads only the text)
        probe.done("answered", Reply(text="".join(parts), message=None), self.engine.count_tokens)
        if info is not None:
            info["model"] = public_id(answered.get("model_id", self.engine.model_id))

    async def _generate(self, message: Message, history: list[tuple[str, str]], params: SamplingParams,
                      on_delta: Callable[[str], Any] | None = None, retry_of: int | None = None) -> Reply | None:
        """Prompt, generate, run the reply hooks and log a model reply to `message` after `history`."""
        engine = await self.generator.ready()  # Busy when a remote engine cannot be reached
        scope = self.scopes.resolve(message)
        self.scopes.note(message, scope)  # its exchanges train that scope's adapter
        prompt = build_prompt(message.text, history, engine.count_tokens,
                              budget=engine.block_size - min(params.max_new_tokens, engine.block_size // 2),
                              persona=self.scopes.persona(scope))
        await self._call("prompt_built", bot=self, message=message, prompt=prompt)

        parts: list[str] = []
        answered: dict[str, Any] = {}  # which weights answered: the stream says (a hot swap or a remote may differ)
        # aclosing: when on_delta raises (the client went away), the engine stops now, not at garbage collection.
        async with aclosing(self.generator.stream(prompt.text, params, self.scope_adapter(scope), answered)) as stream:
            async for delta in stream:
                if not parts:
                    delta = delta.lstrip()  # the prompt ends at "Assistant:"; the reply's first space is format
                    if not delta:
                        continue
                parts.append(delta)
                if on_delta is not None:
                    await await_me_maybe(on_delta(delta))
        reply = Reply(text="".join(parts).strip(), message=message, model_id=answered.get("model_id", engine.model_id))
        await self._call("reply_ready", bot=self, message=message, reply=reply)
        if not reply.text:
            return None
        said = await self.store.run(decide, self.config, self.store, message)  # provenance, fixed now
        exchange = await self.store.run(self.store.log_exchange, message, reply.text, model_id=reply.model_id,
                                        params=params, policy=said.policy, consent=said.consent,
                                        trainable=said.trainable)
        if retry_of is not None:
            await self.store.run(self.store.link_retry, exchange.id, retry_of)
        reply.exchange_id = exchange.id
        await self._call("exchange_logged", bot=self, exchange=exchange)
        return reply

    def scope_adapter(self, scope: Any) -> tuple[str, str] | None:
        """(scope name, adapter file) when `scope` has a promoted adapter of its own (a thread: its channel's).
        A front end (`chatcore.remote`) names the scope only: its serving box holds the adapters."""
        if scope is None:
            return None
        if self.config["model"]["remote"]:
            return scope.name, ""
        promoted = serving_checkpoint(adapter_dir(models_dir(self.config), scope))
        return None if promoted is None else (scope.name, str(promoted))

    async def record_delivery(self, reply: Reply, platform_message_id: str) -> None:
        """Remember which platform message carried `reply`, so reactions to it count as feedback."""
        if reply.exchange_id is not None:
            await self.store.run(self.store.set_platform_message_id, reply.exchange_id, str(platform_message_id))

    async def first_delivery(self, source: str, event_id: str) -> bool:
        """True the first time any instance on this history sees this platform event; False for a redelivery."""
        return await self.store.run(self.store.first_delivery, source, str(event_id))

    async def feedback(self, adapter: str, platform_message_id: str, user: str, value: int) -> bool:
        """A user rated the reply carried by a platform message; False if it is not one of ours."""
        exchange = await self.store.run(self.store.find_by_platform_message_id, adapter, str(platform_message_id))
        if exchange is None:
            return False
        await self.rate(exchange, f"{adapter}:{user}", value)
        return True

    async def withdraw_feedback(self, adapter: str, platform_message_id: str, user: str, value: int) -> bool:
        """A user took back a reaction worth `value` from a reply; their vote goes if it still is that one."""
        exchange = self.store.find_by_platform_message_id(adapter, str(platform_message_id))
        if exchange is None:
            return False
        user_key = f"{adapter}:{user}"
        if self.store.remove_feedback(exchange.id, user_key, 1 if value > 0 else -1):
            await self._call("feedback_received", bot=self, exchange=exchange, user=user_key, value=0)
        return True

    async def retry(self, message: Message) -> Reply | None:
        """Answer the last message of `message`'s conversation again with another seed (/retry); None: nothing to retry.

        The new reply replaces the old one in the conversation's history; the two become a
        preference pair once the user rates one of them or keeps the new one (see `Store.preference_pairs`).
        """
        last = await self.store.run(self.store.last_exchange, message)
        if last is None:
            return None
        # the asker's own message, so who vouches for them (and where they said it) carries over to the retry
        original = dataclasses.replace(message, text=last.user_text, id=None)
        history = await self.store.run(self.store.context_before, last.id, limit=self.config["bot"]["history_turns"])
        return await self._generate(original, history, self.retry_params(last.params), retry_of=last.id)

    async def retry_reply(self, adapter: str, platform_message_id: str, user: str) -> Reply | None:
        """🔁 on a reply: retry it if it is the last reply of the reacting user's own conversation, else None."""
        exchange = await self.store.run(self.store.find_by_platform_message_id, adapter, str(platform_message_id))
        if exchange is None or exchange.user != str(user):
            return None
        message = Message(text=exchange.user_text, adapter=adapter, channel=exchange.channel, user=exchange.user,
                          workspace=exchange.workspace)
        last = await self.store.run(self.store.last_exchange, message)
        if last is None or last.id != exchange.id:
            return None  # an older reply: the conversation has moved on since
        return await self.retry(message)

    def retry_params(self, stored: dict[str, Any]) -> SamplingParams:
        """The sampler settings of a stored reply with a fresh seed (a greedy reply is resampled at 0.8)."""
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        params = dataclasses.replace(self.params, **{k: (tuple(v) if k == "stop" else v)
                                                     for k, v in stored.items() if k in known})
        seed = random.randrange(2**31)
        if params.seed is not None and seed == params.seed:
            seed += 1
        return dataclasses.replace(params, seed=seed, temperature=params.temperature or 0.8)

    async def rate(self, exchange: Any, user_key: str, value: int) -> None:
        value = 1 if value > 0 else -1
        await self.store.run(self.store.add_feedback, exchange.id, user_key, value)
        await self._call("feedback_received", bot=self, exchange=exchange, user=user_key, value=value)

    # --- running adapters ------------------------------------------------------------

    def enabled_adapters(self, names: Iterable[str] | None = None) -> list[Any]:
        wanted = list(names) if names is not None else [
            name for name, section in self.config["adapters"].items() if section.get("enabled")]
        missing = [n for n in wanted if n not in self.adapter_classes]
        if missing:
            why = [self.pm.unavailable.get(n, f"no adapter named {n!r}") for n in missing]
            raise AdapterError("; ".join(why))
        return [self.adapter_classes[n](self, self.config["adapters"].get(n, {})) for n in wanted]

    async def run(self, adapter_names: Iterable[str] | None = None) -> None:
        """Start the adapters and serve until they all finish or `stop()` is called."""
        self.adapters = self.enabled_adapters(adapter_names)
        if not self.adapters:
            raise AdapterError("no adapter is enabled: set adapters.<name>.enabled: true in the config")
        await self._call("startup", bot=self)
        try:
            await self.generator.ready()  # a remote engine says its model and context size now (chatcore.remote)
        except Busy:
            pass  # logged; each request asks again
        tasks = [asyncio.create_task(a.start(), name=f"adapter:{a.name}") for a in self.adapters]
        follower = asyncio.create_task(self.follow_registry(), name="registry")
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            pending = set(tasks)
            while pending and not self._stopping.is_set():
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
                for task in done:
                    if task is not stopper and task.exception() is not None:
                        raise task.exception()
        finally:
            stopper.cancel()
            follower.cancel()
            await self.close_adapters()
            # let each adapter finish (or refuse) the requests it has in flight before cancelling it
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._call("shutdown", bot=self)

    def stop(self) -> None:
        self._stopping.set()

    async def follow_registry(self) -> None:
        """Serve what registry.json says, within seconds of a change made by any process (runs until cancelled).

        The new engine loads off the event loop and is swapped in whole: requests already running
        finish on the old one, none is dropped."""
        watch = self.registry_watch
        nudged = self._listen_for_registry_changes()
        while True:
            try:  # a NOTIFY from another instance on the same PostgreSQL history cuts the wait short
                await asyncio.wait_for(nudged.wait(), self.registry_poll_s)
            except asyncio.TimeoutError:
                pass
            announced = nudged.is_set()
            nudged.clear()
            # Announced: read registry.json even if its stat looks unchanged (a shared NFS folder caches attributes).
            if not await asyncio.to_thread(watch.changed) and not announced:
                continue
            try:
                engine = await asyncio.to_thread(watch.engine_if_needed, self.generator.engine)
            except Exception as exc:  # a bad checkpoint or config: keep serving what serves
                log.error("the registry changed but its model failed to load; still serving %s: %s",
                          self.generator.engine.model_id, exc)
                continue
            if engine is not None:
                self.generator.swap(engine)
                log.info("now serving %s (registry.json changed)", engine.model_id)

    @property
    def registry_listening(self) -> bool:
        """True while subscribed to the promotions other instances announce (PostgreSQL history only)."""
        return self._registry_listener is not None and self._registry_listener.listening.is_set()

    def _listen_for_registry_changes(self) -> asyncio.Event:
        """An event set whenever an instance announces a promotion or rollback (PostgreSQL history only)."""
        nudged = asyncio.Event()
        url = self.config.store_url
        if is_postgres_url(url):
            from .postgres import REGISTRY_CHANNEL, Listener

            loop = asyncio.get_running_loop()
            if self._registry_listener is not None:
                self._registry_listener.close()
            self._registry_listener = Listener(url, REGISTRY_CHANNEL, lambda _: loop.call_soon_threadsafe(nudged.set))
        return nudged

    async def close_adapters(self) -> None:
        for adapter in self.adapters:
            try:
                await adapter.stop()
            except Exception:
                log.exception("adapter %s did not stop cleanly", adapter.name)

    async def close(self) -> None:
        if self._registry_listener is not None:
            await asyncio.to_thread(self._registry_listener.close)
            self._registry_listener = None
        await self.generator.close()
        await self.store.run(self.store.close)  # after the writes queued before it

    # --- hook calling ------------------------------------------------------------------

    async def _call(self, name: str, **kwargs: Any) -> list[Any]:
        return await call_hook(self.pm, name, **kwargs)

    async def _first_result(self, name: str, **kwargs: Any) -> Any:
        """A firstresult hook whose implementations may be async: the first non-None answer wins."""
        caller = getattr(self.pm.hook, name)
        trace = self.pm.tracing
        for impl in reversed(caller.get_hookimpls()):  # pluggy's own call order
            result = await await_me_maybe(impl.function(**{a: kwargs[a] for a in impl.argnames}))
            if trace:
                trace(f"{name} [{impl.plugin_name}] returned {result!r:.120}")
            if result is not None:
                return result
        return None
