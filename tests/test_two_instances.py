"""Two `chatcore run` instances on one PostgreSQL and one shared models folder (issue 13, "Done when").

32 concurrent OpenAI clients (the real `openai` package, half of them streaming) spread over both
instances; auto fine-tuning crosses its threshold while they talk. Checked: every answered
exchange is stored exactly once (rows counted in PostgreSQL), exactly one fine-tune job starts,
both instances serve the promoted model afterwards, and no request fails: each one is answered
or refused with the explicit busy answer (503 ``busy`` or 429, which clients retry), during the
swap too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import psycopg
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from tests.instances import finetune_jobs, free_port, instance_config, seed_history, start_instances, stored_replies

API_KEY = "two-instances-test-key"
CLIENTS = 32
EVERY = 40  # new exchanges per fine-tune: crossed within the first seconds of traffic
PREFIX = "[2i "  # every user text the clients send starts with it; nothing else in the history does


@dataclass
class Request:
    client: int
    instance: str
    text: str
    outcome: str  # answered | busy | error
    reply: str = ""
    model: str = ""
    detail: str = ""
    started_at: float = 0.0
    done_at: float = 0.0


async def talk(i: int, instance, lines: list[str], stop: asyncio.Event, out: list[Request]) -> None:
    """One client: messages back to back on its own conversation until `stop`; busy answers wait and go on."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{instance.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    stream = i % 2 == 1
    j = 0
    try:
        while not stop.is_set():
            text = f"{PREFIX}{i}.{j}] {lines[(i * 31 + j) % len(lines)]}"
            j += 1
            req = Request(i, instance.name, text, "answered", started_at=time.monotonic())
            kwargs = dict(model="chatcore", user=f"client{i}", messages=[{"role": "user", "content": text}])
            try:
                if stream:
                    parts = []
                    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                        req.model = chunk.model
                        parts += [c.delta.content or "" for c in chunk.choices]
                    req.reply = "".join(parts)
                else:
                    completion = await client.chat.completions.create(**kwargs)
                    req.reply, req.model = completion.choices[0].message.content or "", completion.model
            except openai.APIStatusError as exc:
                busy = exc.status_code == 429 or (exc.status_code == 503 and "busy" in str(exc.body))
                req.outcome, req.detail = ("busy" if busy else "error"), f"HTTP {exc.status_code}: {exc.body}"
            except Exception as exc:  # a dropped connection, a broken stream: all errors
                req.outcome, req.detail = "error", f"{type(exc).__name__}: {exc}"
            req.done_at = time.monotonic()
            out.append(req)
            # a person's pace, a message every 2 s each: 2 cores also run two bots, PostgreSQL and the trainer
            await asyncio.sleep(2.0 + (i % 5) / 10)
    finally:
        await client.close()


async def wait_for(what: str, check, deadline: float, instances) -> object:
    while not (found := await asyncio.to_thread(check)):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {i.name}\n{i.log()[-2500:]}" for i in instances)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        for inst in instances:
            assert inst.proc.poll() is None, f"{inst.name} exited:\n{inst.log()[-3000:]}"
        await asyncio.sleep(0.25)
    return found


@pytest.mark.slow  # two bot processes, 32 clients and a fine-tune worker: 50-281 s on 2 shared cores
async def test_two_instances_store_once_train_once_and_both_swap_without_dropping(pg_cluster, tmp_path,
                                                                                 sample_conversations):
    pytest.importorskip("openai")
    url = pg_cluster.new_database()  # empty: both instances create the schema at once
    shared = tmp_path / "shared"  # the volume both instances mount as bot.data_dir: one models/ folder
    torch.manual_seed(0)
    base = checkpoint.save(GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)), tmp_path / "base",
                           base_model="random-test")
    configs = [instance_config(name=f"inst{n}", data_dir=shared, history_url=url, port=free_port(),
                               api_key=API_KEY, checkpoint=base, every=EVERY) for n in range(2)]
    instances = await asyncio.to_thread(start_instances, configs, tmp_path)
    codes = []
    try:
        seed_history(url, sample_conversations)  # what the fine-tune learns from besides the clients' talk
        old = {inst.name: inst.health()["model"] for inst in instances}
        lines = [json.loads(ln)["user"][:120] for ln in sample_conversations.read_text(encoding="utf-8").splitlines()
                 if ln.strip()]
        stop, records = asyncio.Event(), []
        clients = [asyncio.create_task(talk(i, instances[i % 2], lines, stop, records)) for i in range(CLIENTS)]
        models = shared / "models"
        deadline = time.monotonic() + 480  # the job alone took ~4 min when the 2 cores were shared with a dozen busy processes
        try:
            await wait_for("a fine-tune job to start", lambda: (models / "jobs").is_dir() and any((models / "jobs").iterdir()),
                           deadline, instances)
            history = await wait_for("the gate's verdict", lambda: (h := finetune_jobs(url, models))["marks"] and h,
                                     deadline, instances)
            assert history["serving"], f"the candidate was not promoted: {history}"
            promoted = Path(history["serving"]).stem

            def both_serve_it():
                return all((h := inst.health()) and h["model"].startswith(promoted) for inst in instances)

            await wait_for("both instances to serve the promoted model", both_serve_it, deadline, instances)
            swapped = time.monotonic()
            # keep talking until each instance has answered with the new model, after both swapped
            await wait_for("answers from the promoted model on both instances", lambda: all(
                any(r.instance == inst.name and r.started_at > swapped and r.outcome == "answered"
                    for r in list(records)) for inst in instances), deadline, instances)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        history = finetune_jobs(url, models)
        stored = stored_replies(url, PREFIX)
    finally:
        codes = [await asyncio.to_thread(inst.stop) for inst in instances]
    logs = {inst.name: inst.log() for inst in instances}

    errors = [r for r in records if r.outcome == "error"]
    assert not errors, f"{len(errors)} failed requests, e.g. {[(r.instance, r.detail) for r in errors[:5]]}"
    answered = [r for r in records if r.outcome == "answered"]
    busy = [r for r in records if r.outcome == "busy"]
    assert len(answered) + len(busy) == len(records) and len(answered) > EVERY
    assert {r.instance for r in answered} == {"inst0", "inst1"}

    # every answered exchange stored exactly once, with the reply the client got; refused ones never
    logged = [r for r in answered if r.reply.strip()]  # an empty reply is answered and, by design, not logged
    wrong = [(r.text, r.reply, stored.get(r.text)) for r in logged if stored.get(r.text) != [r.reply.strip()]]
    assert not wrong, f"{len(wrong)} answered exchanges not stored exactly once, e.g. {wrong[:3]}"
    assert sum(len(v) for v in stored.values()) == len(logged)
    assert not [r.text for r in busy if r.text in stored]

    # exactly one job, across both instances: one job folder, one fine-tune mark, one promotion
    assert len(history["jobs"]) == 1 and history["marks"] == [history["serving"]] == history["promoted"], history
    started = {name: len(re.findall(r"fine-tune job \S+ started", log)) for name, log in logs.items()}
    assert sum(started.values()) == 1, started

    # both served the base first, and the promoted model to every request sent after they swapped
    assert all(not m.startswith(promoted) for m in old.values()), old
    after = [r for r in answered if r.started_at > swapped]
    assert {r.instance for r in after} == {"inst0", "inst1"}
    assert all(r.model.startswith(promoted) for r in after), {(r.instance, r.model) for r in after}
    assert codes == [0, 0], {name: log[-2000:] for name, log in logs.items()}


def test_users_left_out_of_training_are_read_on_both_backends(history_url):
    # A fine-tune job's spec asks the store who to leave out; PostgreSQL (before 16) refused the query.
    from chatcore.message import Message
    from chatcore.store import Store

    with Store(history_url) as store:
        store.log_exchange(Message(text="hi", adapter="http", channel="c", user="ann", is_direct=True), "hello",
                           model_id="m", params=None)
        store.set_consent("http:ann", "no")
        store.opt_out("http:bob")
        assert set(store.excluded_users()) == {"http:ann", "http:bob"}


def test_instances_starting_together_on_an_empty_postgresql_migrate_it_once(pg_cluster):
    # The second instance looked for the schema before the first created it, then waited on the write lock:
    # PostgreSQL's catalog cache still said "no schema_version" and it ran migration 1 again ("already exists").
    import threading

    from chatcore import postgres
    from chatcore.store import MIGRATIONS, SCHEMA_VERSION, Store

    url = pg_cluster.new_database()
    first = postgres.connect(url, timeout=30)
    first.execute("BEGIN IMMEDIATE")  # the first instance migrates, holding the write lock
    opened: list = []
    second = threading.Thread(target=lambda: opened.append(_open(Store, url)))
    second.start()
    with psycopg.connect(url, autocommit=True) as admin:  # until the second one waits for the lock
        for _ in range(200):
            if admin.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()[0]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the second instance never waited for the write lock")
    for statements in MIGRATIONS:
        for statement in statements:
            first.execute(statement)
    first.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    first.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    first.execute("COMMIT")
    first.close()
    second.join(60)
    assert opened and not isinstance(opened[0], Exception), opened
    opened[0].close()


def _open(store_class, url):
    try:
        return store_class(url, timeout=30)
    except Exception as exc:  # returned, asserted by the caller
        return exc


async def test_an_instance_starting_while_another_trains_leaves_the_jobs_files_alone(pg_cluster, tmp_path):
    # On a shared folder whose file locks do not reach other machines, only the database lock says a job runs
    # elsewhere: the starting instance must not take its half-written candidate for a crash's leftover.
    from chatcore import postgres
    from chatcore.plugins import auto_finetune
    from chatcore.testing import make_bot

    url = pg_cluster.new_database()
    models = tmp_path / "models"
    models.mkdir()
    writing = models / ".finetuned_20260101_000000.safetensors.tmp"  # checkpoint.save's temporary name
    writing.write_bytes(b"half a checkpoint")
    held = postgres.try_lock(url, postgres.JOB_LOCK)  # the other machine's running job
    bot = make_bot(tmp_path, config={"history": {"url": url}})
    try:
        await auto_finetune.startup(bot)
        assert writing.exists()
        held.close()
        await auto_finetune.startup(bot)  # no job runs anywhere: now it is a leftover
        assert not writing.exists()
    finally:
        held.close()
        await bot.close()


async def test_an_announced_change_is_read_even_when_the_registry_file_looks_unchanged(pg_cluster, tmp_path):
    # On NFS a file's cached attributes can hide another machine's write for up to a minute; the NOTIFY
    # says it happened, so the instance reads registry.json (opening a file revalidates it) at once.
    from chatcore.postgres import announce_registry_change
    from chatcore.testing import make_bot, until_registry_listening

    url = pg_cluster.new_database()
    bot = make_bot(tmp_path, config={"history": {"url": url}})
    bot.registry_poll_s = 3600  # only a NOTIFY can make it look before the test ends
    read = asyncio.Event()

    class StaleWatch:
        def changed(self):
            return False  # the attributes the client cached

        def engine_if_needed(self, current):
            read.set()
            return None

    bot.registry_watch = StaleWatch()
    follower = asyncio.create_task(bot.follow_registry())
    try:
        await until_registry_listening(bot)
        await asyncio.to_thread(announce_registry_change, url, "finetuned_x")
        await asyncio.wait_for(read.wait(), 10)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await bot.close()


async def test_a_rollback_or_promotion_on_the_dashboard_is_announced_to_the_other_instances(pg_cluster, tmp_path):
    import threading

    from chatcore.dashboard import Dashboard
    from chatcore.postgres import REGISTRY_CHANNEL, Listener
    from chatcore.testing import make_bot

    from .dashboard_fixtures import PASSWORD, fill_models

    url = pg_cluster.new_database()
    bot = make_bot(tmp_path, config={"history": {"url": url}, "dashboard": {
        "enabled": True, "port": 0, "admins": {"alice": "${DASH_PW}"}}}, environ={"DASH_PW": PASSWORD})
    fill_models(tmp_path / "models")
    heard, got = [], threading.Event()
    other = Listener(url, REGISTRY_CHANNEL, lambda payload: (heard.append(payload), got.set()))  # another instance
    try:
        assert await asyncio.to_thread(other.listening.wait, 10)
        server = Dashboard(bot, bot.config["dashboard"])
        await server.do_rollback({"confirm": True})
        assert await asyncio.to_thread(got.wait, 10), "the rollback was not announced"
        got.clear()
        await server.do_promote({"confirm": True, "name": "finetuned_20260101_000001.safetensors"})
        assert await asyncio.to_thread(got.wait, 10), "the promotion was not announced"
    finally:
        await asyncio.to_thread(other.close)
        await bot.close()
