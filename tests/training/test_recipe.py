"""The default recipe's replay: general exchanges on the training side only, from a file or the starter corpus."""

from __future__ import annotations

import json

import pytest
import torch

from chatcore.tokenizer import Tokenizer
from chatcore.training.data import build_dataset, load_jsonl, tokenize
from chatcore.training.job import add_replay
from chatcore.training.options import TrainConfig
from chatcore.training.starter import general_exchanges


@pytest.fixture()
def general_file(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"user": f"how was day {i}?", "assistant": f"day {i} was fine, thanks"}) + "\n"
                            for i in range(40)), encoding="utf-8")
    return path


def test_replay_option_is_validated():
    assert TrainConfig.from_dict({"replay": 0.5}).replay == 0.5
    with pytest.raises(ValueError, match="replay"):
        TrainConfig.from_dict({"replay": -1})


def test_general_exchanges_are_a_deterministic_sample_with_their_own_conversations(general_file):
    picked = general_exchanges(10, seed=3, source=general_file)
    assert len(picked) == 10 and picked == general_exchanges(10, seed=3, source=general_file)
    assert len({e.conversation for e in picked}) == 10 and all(e.conversation.startswith("replay:") for e in picked)
    assert len(general_exchanges(100, seed=3, source=general_file)) == 40  # never more than the source has


def test_replay_goes_to_the_training_side_only(sample_conversations, general_file):
    tok = Tokenizer()
    data = build_dataset(load_jsonl(sample_conversations)[0], tok)
    train_before, val_before, lineage = len(data.train), data.val.tokens.clone(), dict(data.lineage)
    cfg = TrainConfig.from_dict({"replay": 0.1, "replay_source": str(general_file)})
    add_replay(data, tok, cfg)
    extra = tokenize(general_exchanges(round(0.1 * data.train_exchanges), cfg.seed, general_file), tok, cfg.loss_on)
    assert len(data.train) == train_before + len(extra)
    assert data.train.mask[train_before:].tolist() == extra.mask.tolist()  # the loss as configured
    assert data.val.tokens.equal(val_before) and data.lineage == lineage  # the gate's data and the lineage unchanged


def test_missing_replay_source_trains_without_replay(sample_conversations, tmp_path, caplog):
    tok = Tokenizer()
    data = build_dataset(load_jsonl(sample_conversations)[0], tok)
    n = len(data.train)
    add_replay(data, tok, TrainConfig.from_dict({"replay": 1.0, "replay_source": str(tmp_path / "missing.jsonl")}))
    assert len(data.train) == n and "without replay" in caplog.text


def test_sft_weight_keeps_the_preferred_replies_likely_while_learning_the_preference():
    from chatcore.training.options import PreferenceConfig
    from chatcore.training.preference import chosen_nll, preference_metrics, scores, train_preferences
    from tests.training.test_preference import CFG, TOK, synthetic, tiny

    assert chosen_nll(torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])).item() == pytest.approx(2.0)  # 8 nats / 4 tokens
    train_set, held = synthetic(40, seed=1), synthetic(20, seed=2)
    good = [(p.prompt, p.chosen) for p in held.pairs] + [(e.prompt, e.reply) for e in held.labelled if e.label > 0]
    likelihood, accuracy = {}, {}
    for w in (0.0, 1.0):
        model = tiny(2)
        train_preferences(model, TOK, train_set, PreferenceConfig(**{**CFG, "sft_weight": w}))
        likelihood[w] = sum(scores(model, TOK, good, 64)) / len(good)
        accuracy[w] = preference_metrics(model, TOK, held, 64)["accuracy"]
    assert likelihood[1.0] > likelihood[0.0] + 0.5  # nats per token
    assert accuracy[1.0] > 0.9


def test_the_auto_fine_tune_and_chatcore_finetune_get_the_recipe(tmp_path):
    # Both build their job with spec_from_config from the bot's config: with no training options set,
    # and with the shipped config/default.yaml, the job trains with the TrainConfig defaults.
    from pathlib import Path

    from chatcore.config import load_config
    from chatcore.plugin_manager import make_plugin_manager
    from chatcore.training.job import spec_from_config
    from chatcore.training.options import PreferenceConfig

    schema = make_plugin_manager(entry_points=False).schema()
    shipped = Path(__file__).resolve().parents[2] / "config" / "default.yaml"
    for path in (None, shipped):
        spec = spec_from_config(load_config(path, schema), base="gpt2")
        assert spec.train.get("learning_rate") == TrainConfig().learning_rate and spec.train["replay"] == TrainConfig().replay
        assert TrainConfig.from_dict(spec.train) == TrainConfig()
        assert PreferenceConfig.from_dict(spec.preference) == PreferenceConfig()
    assert TrainConfig().replay > 0 and TrainConfig().loss_on == "all"
