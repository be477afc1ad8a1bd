"""Fine-tuning loop, promotion gate and registry, on tiny models and the sample conversations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.store import Store
from chatcore.tokenizer import Tokenizer
from chatcore.training.data import build_dataset, load_jsonl
from chatcore.registry import Registry, serving_checkpoint
from chatcore.training.gate import GateConfig, judge
from chatcore.training.job import JobSpec, run_job
from chatcore.training.train import TrainConfig, evaluate, get_lr, train
from tests.engine_fixtures import tiny_model, torch_threads

# Tiny and short: the 50257-token head dominates a tiny model's step, so few, small batches.
FAST = dict(max_iters=30, eval_interval=10, warmup_iters=3, batch_size=4, block_size=64,
            learning_rate=3e-3, min_lr=3e-4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two threads on a busy 2-core machine are slower than one; restore for other modules.
    with torch_threads(1):
        yield


def tiny(seed: int = 0) -> GPT:
    return tiny_model(seed, block_size=128)


@pytest.fixture(scope="module")
def dataset(one_thread, sample_conversations):
    exchanges, _ = load_jsonl(sample_conversations)
    return build_dataset(exchanges, Tokenizer())


@pytest.fixture(scope="module")
def trained(dataset):
    """A tiny model fine-tuned on the sample's training split, and its outcome."""
    model = tiny()
    outcome = train(model, dataset, TrainConfig(**FAST), progress=False)
    return model, outcome


def test_schedule_is_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig().for_width(96)  # as wide as the starter
    assert get_lr(0, cfg) < get_lr(10, cfg) < get_lr(19, cfg) <= 1e-3
    assert get_lr(20, cfg) == pytest.approx(1e-3, rel=1e-3)
    assert get_lr(399, cfg) == pytest.approx(1e-4, rel=1e-2)
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="loss_on"):
        TrainConfig.from_dict({"loss_on": "everything"})


def test_finetuning_lowers_validation_loss(trained, dataset):
    model, outcome = trained
    assert outcome.best_val_loss < outcome.initial_val_loss - 1.0
    # the model holds its best weights, and the loss is reproducible from them
    assert evaluate(model, dataset.val, block_size=64) == pytest.approx(outcome.best_val_loss, rel=1e-5)
    assert [h["iter"] for h in outcome.history] == [0, 10, 20, 30]
    assert not model.training and all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_training_is_deterministic_with_a_seed(dataset):
    cfg = TrainConfig(**{**FAST, "max_iters": 6, "eval_interval": 3})
    a, b = tiny(), tiny()
    oa = train(a, dataset, cfg, progress=False)
    ob = train(b, dataset, cfg, progress=False)
    assert oa.history == ob.history
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_head_only_on_targets_is_the_same_loss_as_the_full_forward(dataset):
    model = tiny().eval()
    from chatcore.training.data import get_batch
    from chatcore.training.train import loss_sum

    x, y = get_batch(dataset.train, 3, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        s, n = loss_sum(model, x, y)
        _, full = model(x, y)
    assert (s / n).item() == pytest.approx(full.item(), rel=1e-5)


def test_early_stopping_stops_and_keeps_the_best(dataset):
    model = tiny()
    # a learning rate this small cannot improve by min_delta: stop after `patience` evaluations
    cfg = TrainConfig(**{**FAST, "learning_rate": 1e-9, "min_lr": 0.0, "patience": 2, "eval_interval": 2,
                         "max_iters": 100})
    outcome = train(model, dataset, cfg, progress=False)
    assert outcome.stopped == "early_stop" and outcome.iters == 4
    assert outcome.best_iter == 0


def test_gate_promotes_better_and_rejects_worse(trained, dataset):
    better, _ = trained
    worse = tiny(seed=1).eval()
    assert judge(better, worse, dataset.val).promoted
    verdict = judge(worse, better, dataset.val)
    assert not verdict.promoted and "does not beat" in verdict.reason
    assert verdict.candidate_val_loss > verdict.serving_val_loss
    # equal is not better
    assert not judge(better, copy.deepcopy(better), dataset.val).promoted
    # a general-text regression limit can veto a candidate that wins on the chat data
    from chatcore.training.data import TokenData

    tokens = TokenData(dataset.train.tokens[:600], dataset.train.mask[:600])  # a stand-in general-text set
    veto = judge(better, worse, dataset.val, GateConfig(max_general_regression=-100.0, eval_block_size=64),
                 general=tokens)
    assert not veto.promoted and "general-text" in veto.reason


def test_registry_keeps_last_k_and_rolls_back(tmp_path):
    reg = Registry(tmp_path, keep=2, keep_rejected=1)
    paths = []
    for i in range(4):
        p = checkpoint.save(tiny(), tmp_path / f"finetuned_2026010{i}_000000")
        paths.append(p)
    assert reg.current() is None
    for p in paths[:3]:
        reg.promote(p, {"i": 1})
    assert reg.current() == paths[2]
    assert not paths[0].exists() and not paths[0].with_suffix(".json").exists()  # beyond the last 2
    assert paths[1].exists() and paths[2].exists()
    reg.reject(paths[3])
    assert paths[3].exists()  # kept for inspection
    assert reg.rollback() == paths[1]
    assert serving_checkpoint(tmp_path) == paths[1]
    assert reg.rollback() is None  # back to the configured base model
    with pytest.raises(LookupError):
        reg.rollback()
    with pytest.raises(ValueError):
        reg.promote(tmp_path / "elsewhere.safetensors")


def test_job_end_to_end_writes_a_candidate_with_provenance(tmp_path, sample_conversations):
    base = checkpoint.save(tiny(), tmp_path / "base", base_model="random-test")
    models = tmp_path / "models"
    store = Store(tmp_path / "history.db")
    store.import_jsonl(sample_conversations)
    store.close()
    spec = JobSpec(models_dir=str(models), base=str(base), store=str(tmp_path / "history.db"),
                   train={**FAST, "max_iters": 10, "eval_interval": 5}, progress=False, threads=1)
    result = run_job(spec)
    assert result["status"] == "promoted", result["gate"]
    cand = Path(result["candidate"])
    assert cand.parent == models and cand.name.startswith("finetuned_") and cand.suffix == ".safetensors"
    model, meta = checkpoint.load(cand)
    prov = meta["provenance"]
    assert prov["base_model"] == str(base) and prov["data_hash"] == result["data"]["data_hash"]
    assert prov["val_loss"] == pytest.approx(result["gate"]["candidate_val_loss"], rel=1e-4)
    assert prov["data"]["train_exchanges"] > 300 and prov["iteration"] == 10
    assert Registry(models).current() == cand
    with Store(tmp_path / "history.db") as s:
        assert s.exchanges_since_finetune() == 0  # the counter restarts
        assert s.last_finetune()["checkpoint"] == cand.name
    assert not list(models.glob(".*.tmp"))


def test_output_vocab_loss_is_the_exact_full_vocabulary_loss(dataset):
    from chatcore.training.data import get_batch
    from chatcore.training.train import OutputVocab, loss_sum

    model = tiny().eval()
    vocab = OutputVocab.most_frequent(dataset.train.tokens, 500, model.config.vocab_size)
    vocab.tie(model)
    x, y = get_batch(dataset.train, 3, 64, torch.Generator().manual_seed(2))
    with torch.no_grad():
        s, n = loss_sum(model, x, y, vocab)
        _, full = model(x, y)
    assert (y >= 0).logical_and(vocab.index[y.clamp(min=0)] < 0).any()  # some targets are rest tokens
    assert (s / n).item() == pytest.approx(full.item(), rel=1e-5)
    # the rest rows stay zero through training
    model.train()
    s, n = loss_sum(model, x, y, vocab)
    (s / n).backward()
    rest = vocab.index < 0
    assert model.transformer.wte.weight.grad[rest].abs().sum() == 0


def test_unset_learning_rates_shrink_with_width_and_set_ones_stay():
    assert TrainConfig().for_width(64).learning_rate == pytest.approx(1e-3)  # narrower than the starter: no raise
    gpt2 = TrainConfig().for_width(768)
    assert gpt2.learning_rate == pytest.approx(1.25e-4) and gpt2.min_lr == pytest.approx(1.25e-5)
    mine = TrainConfig(learning_rate=3e-5).for_width(768)
    assert mine.learning_rate == 3e-5 and mine.min_lr == pytest.approx(3e-6)  # the floor follows the set peak
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig.from_dict({"learning_rate": 1e-4, "min_lr": 1e-3})

