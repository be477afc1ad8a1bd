"""LoRA fine-tuning (chatcore/lora.py): training, merging, adapter files, and the gate/registry/weights path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint, lora
from chatcore.model import GPT, GPTConfig
from chatcore.registry import Registry
from chatcore.store import Store
from chatcore.tokenizer import Tokenizer
from chatcore.training.data import build_dataset, load_jsonl
from chatcore.training.job import JobSpec, load_model, run_job
from chatcore.training.train import TrainConfig, evaluate, loss_sum, train
from chatcore.weights import resolve_model
from tests.engine_fixtures import tiny_model, torch_threads

FAST = dict(max_iters=30, eval_interval=10, warmup_iters=3, batch_size=4, block_size=64,
            learning_rate=1e-2, min_lr=1e-3, method="lora", lora={"rank": 4, "alpha": 8})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def tiny(seed: int = 0) -> GPT:
    return tiny_model(seed, block_size=128)


@pytest.fixture(scope="module")
def dataset(one_thread, sample_conversations):
    exchanges, _ = load_jsonl(sample_conversations)
    return build_dataset(exchanges, Tokenizer())


def steerable(seed: int = 0) -> GPT:
    """A tiny base whose embeddings are large enough that moving the hidden state moves the loss.

    (With GPT-2's 0.02 init every logit of a 32-wide model is near 0, and only the
    frozen head could change that: no low-rank update of the blocks can.)"""
    model = tiny(seed)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.3)
    return model


def test_lora_training_lowers_validation_loss_and_changes_only_the_adapter(dataset):
    model = steerable()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lora.LoRAConfig(rank=4, alpha=8)
    params = lora.apply_lora(model, cfg)
    assert sum(p.numel() for p in params) < 0.05 * sum(p.numel() for p in model.parameters())
    outcome = train(model, dataset, TrainConfig(**FAST), progress=False)
    assert outcome.best_val_loss < outcome.initial_val_loss - 0.5, outcome.history
    assert evaluate(model, dataset.val, block_size=64) == pytest.approx(outcome.best_val_loss, rel=1e-5)
    for k, v in base.items():  # the base is frozen: every original tensor is unchanged
        assert torch.equal(model.state_dict()[k], v), k
    assert set(lora.lora_state_dict(model)) == {
        f"transformer.h.{i}.{t}.{ab}" for i in range(2) for t in lora.TARGETS for ab in ("lora_A", "lora_B")}


def test_top_n_lora_adapts_only_the_last_blocks_and_the_backward_stops_below_them():
    model = tiny_model(0, block_size=64, n_layer=3).train()
    params = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, layers=1))
    assert {name for name, _ in lora.lora_layers(model)} == {f"transformer.h.2.{t}" for t in lora.TARGETS}
    assert all(type(m) is torch.nn.Linear for m in model.transformer.h[:2].modules() if isinstance(m, torch.nn.Linear))
    needs_grad = {}  # block -> whether its output is in the autograd graph (what a backward would run through)
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda m, args, out, i=i: needs_grad.__setitem__(i, out.requires_grad))
    x = torch.randint(0, 50257, (2, 16))
    y = x.clone()
    s, n = loss_sum(model, x, y)
    (s / n).backward()
    assert needs_grad == {0: False, 1: False, 2: True}  # blocks 0 and 1: no graph, so no backward at all
    assert all(p.grad is not None for p in params)
    ids = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in ids)


def test_top_n_lora_training_lowers_validation_loss(dataset):
    model = steerable()
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, layers=1))
    outcome = train(model, dataset, TrainConfig(**FAST), progress=False)
    assert outcome.best_val_loss < outcome.initial_val_loss - 0.3, outcome.history
    assert set(lora.lora_state_dict(model)) == {
        f"transformer.h.1.{t}.{ab}" for t in lora.TARGETS for ab in ("lora_A", "lora_B")}


def test_merged_weights_equal_base_plus_scaled_BA():
    model = tiny()
    cfg = lora.LoRAConfig(rank=4, alpha=12, dropout=0.0, targets=["attn.c_attn", "mlp.c_fc"])
    lora.apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.normal_()  # B starts at zero: give the update some size
    layer = model.transformer.h[1].mlp.c_fc
    want = layer.weight.detach().clone() + (12 / 4) * layer.lora_B.detach() @ layer.lora_A.detach()
    assert not isinstance(model.transformer.h[0].attn.c_proj, lora.LoRALinear)  # not a target
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        before, _ = model(idx)
    merged = lora.merge(model)
    assert type(merged.transformer.h[1].mlp.c_fc) is torch.nn.Linear
    assert torch.allclose(merged.transformer.h[1].mlp.c_fc.weight, want, atol=1e-6)
    with torch.no_grad():
        after, _ = merged(idx)
    assert torch.allclose(before, after, atol=1e-4)


def test_adapter_file_is_small_names_its_base_and_refuses_another_base(tmp_path):
    model = tiny()
    full = checkpoint.save(model, tmp_path / "base", base_model="random-test")
    cfg = lora.LoRAConfig(rank=2, alpha=4)
    lora.apply_lora(model, cfg)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.normal_()
    path = lora.save_adapter(model, tmp_path / "finetuned_a.safetensors", cfg, base_model=str(full), val_loss=1.5)
    assert path.stat().st_size < full.stat().st_size / 20
    assert lora.is_adapter(path) and not lora.is_adapter(full)
    ad = lora.load_adapter(path)
    assert ad.base_model == str(full) and ad.config.rank == 2 and ad.meta["provenance"]["val_loss"] == 1.5
    assert path.with_suffix(".json").is_file()
    # base + adapter through the job's loader equals the trained model, merged
    served, meta = load_model(str(path))
    want = lora.merge(copy.deepcopy(model))
    for k, v in want.state_dict().items():
        assert torch.allclose(served.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(checkpoint.CheckpointError, match="another base"):
        lora.merge_adapter(tiny(seed=5), ad)


def test_lora_options_are_validated():
    with pytest.raises(ValueError, match="method"):
        TrainConfig.from_dict({"method": "qlora"})
    with pytest.raises(ValueError, match="unknown lora option"):
        lora.LoRAConfig.from_dict({"r": 4})
    with pytest.raises(ValueError, match="targets"):
        lora.LoRAConfig.from_dict({"targets": ["lm_head"]})
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="training.lora.layers must be a whole number"):
            lora.LoRAConfig.from_dict({"layers": bad})
    assert lora.LoRAConfig.from_dict({"layers": None}).layers is None
    model = tiny()  # more layers than the model has: all of them
    lora.apply_lora(model, lora.LoRAConfig(layers=3))
    assert len(list(lora.lora_layers(model))) == 2 * len(lora.TARGETS)


def test_lora_job_gate_registry_weights_and_rollback(tmp_path, sample_conversations):
    base = checkpoint.save(steerable(), tmp_path / "base", base_model="random-test")
    models = tmp_path / "models"
    with Store(tmp_path / "history.db") as store:
        store.import_jsonl(sample_conversations)
    spec = JobSpec(models_dir=str(models), base=str(base), store=str(tmp_path / "history.db"),
                   train={**FAST, "max_iters": 10, "eval_interval": 5}, progress=False, threads=1)
    result = run_job(spec)
    assert result["status"] == "promoted", result["gate"]
    cand = Path(result["candidate"])
    assert lora.is_adapter(cand) and Registry(models).current() == cand
    assert cand.stat().st_size < base.stat().st_size / 5
    # weights.py serves base + adapter; the gate's verdict is reproducible from what serves
    model, meta, model_id = resolve_model({"checkpoint": str(cand)})
    assert meta["source"] == str(cand) and meta["base_source"] == str(base) and cand.stem in model_id
    from chatcore.training.data import from_store

    with Store(tmp_path / "history.db") as store:
        data = build_dataset(from_store(store), Tokenizer())
    assert evaluate(model, data.val, block_size=128) == pytest.approx(
        result["gate"]["candidate_val_loss"], rel=1e-4)
    # a second LoRA job is judged against the serving adapter (base + adapter), then rollback works
    result2 = run_job(JobSpec(**{**spec.__dict__, "serving": str(cand)}))
    assert result2["gate"]["serving_val_loss"] == pytest.approx(result["gate"]["candidate_val_loss"], rel=1e-4)
    reg = Registry(models)
    if result2["status"] == "promoted":
        assert reg.rollback() == cand
    assert reg.rollback() is None


def test_a_scope_job_trains_its_adapter_on_its_own_conversations_only(tmp_path, sample_conversations):
    from chatcore.message import Message
    from chatcore.scopes import Scope, adapter_dir

    base = checkpoint.save(steerable(), tmp_path / "base", base_model="random-test")
    exchanges, _ = load_jsonl(sample_conversations)
    with Store(tmp_path / "history.db") as store:
        for i, e in enumerate(exchanges):
            channel = "rust" if i % 3 == 0 else "general"
            store.log_exchange(Message(text=e.user, adapter="discord", channel=channel, user=f"u{i % 7}"),
                               e.assistant, model_id="m", params=None)
        before = store.exchanges_since_finetune()
    folder = adapter_dir(tmp_path / "models", Scope("rust", "discord", channel="rust"))
    spec = JobSpec(models_dir=str(folder), base=str(base), store=str(tmp_path / "history.db"),
                   train={**FAST, "max_iters": 10, "eval_interval": 5}, progress=False, threads=1,
                   guards={"max_user_share": None}, scope="rust", scope_channels=["discord:rust"])
    result = run_job(spec)
    data = result["data"]
    assert data["train_exchanges"] + data["val_exchanges"] <= len(exchanges[0::3])
    assert data["train_exchanges"] + data["val_exchanges"] > 0.8 * len(exchanges[0::3])
    assert result["scope"] == "rust" and Path(result["candidate"]).parent == folder
    if result["status"] == "promoted":
        assert Registry(folder).current() == Path(result["candidate"])
    assert not (tmp_path / "models" / "registry.json").exists()  # the bot-wide model is untouched
    with Store(tmp_path / "history.db") as store:
        assert store.exchanges_since_finetune() == before  # and so is its counter
    import json

    assert json.loads((folder / "last_finetune.json").read_text())["up_to_id"] > 0
