"""Auto-fine-tune counts per scope: a scope's exchanges (its threads' too) start that scope's adapter job."""

from __future__ import annotations

from chatcore.message import Message
from chatcore.testing import make_bot

SCOPES = [{"name": "rust", "adapter": "discord", "channel": "100"}]


async def test_a_scopes_exchanges_start_its_own_job(tmp_path, monkeypatch):
    from chatcore.plugins import auto_finetune

    started = []

    async def fake_start(bot, scope=None):
        started.append(None if scope is None else scope.name)

    monkeypatch.setattr(auto_finetune, "start_job", fake_start)
    consent = {"policy": "opt_out", "i_have_discords_permission_to_train": True}  # chatcore.consent
    config = {"scopes": SCOPES, "plugins": {"auto_finetune": {"every": 3, "cooldown_minutes": 0}},
              "adapters": {"discord": {"training": consent}}}
    bot = make_bot(tmp_path, config=config)
    try:
        def msg(channel: str, user: str, parent: str | None = None) -> Message:
            return Message(text="hello there", adapter="discord", channel=channel, user=user, parent=parent)

        await bot.handle(msg("100", "a"))
        await bot.handle(msg("555", "b", parent="100"))  # a thread of #100: the same scope
        assert started == []
        await bot.handle(msg("100", "d"))  # the scope's third exchange: its adapter's job
        assert started == ["rust"]
        await bot.handle(msg("9", "c"))  # no scope: the bot-wide count (of every exchange, as before)
        assert started == ["rust", None]
        assert bot.scopes.channels(bot.scopes.by_name["rust"]) == ["discord:100", "discord:555"]
        spec = auto_finetune.state_of(bot).scope_spec  # what the job would get
        assert callable(spec)
    finally:
        await bot.close()


async def test_a_scope_counts_only_consented_exchanges(tmp_path, monkeypatch):
    from chatcore.plugins import auto_finetune

    started = []

    async def fake_start(bot, scope=None):
        started.append(scope)

    monkeypatch.setattr(auto_finetune, "start_job", fake_start)
    config = {"scopes": SCOPES, "plugins": {"auto_finetune": {"every": 2, "cooldown_minutes": 0}}}
    bot = make_bot(tmp_path, config=config)  # Discord's training policy is off by default
    try:
        for user in "abc":
            await bot.handle(Message(text="hello there", adapter="discord", channel="100", user=user))
        assert started == []
    finally:
        await bot.close()


async def test_a_scopes_count_stops_at_the_threshold_and_counts_only_its_channels(tmp_path):
    from chatcore.plugins import auto_finetune

    consent = {"policy": "opt_out", "i_have_discords_permission_to_train": True}
    config = {"scopes": SCOPES, "plugins": {"auto_finetune": {"enabled": False}},
              "adapters": {"discord": {"training": consent}}}
    bot = make_bot(tmp_path, config=config)
    try:
        for i in range(4):
            await bot.handle(Message(text=f"hello {i}", adapter="discord", channel="100", user="a"))
        await bot.handle(Message(text="elsewhere", adapter="discord", channel="9", user="a"))
        scope = bot.scopes.by_name["rust"]
        count = auto_finetune.scope_exchanges_since_finetune
        assert await bot.store.run(count, bot, scope) == 4
        assert await bot.store.run(count, bot, scope, 2) == 2
        assert await bot.store.run(count, bot, scope, 10) == 4
    finally:
        await bot.close()
