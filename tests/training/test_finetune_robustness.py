"""Fine-tunes that crash, get killed or cancelled, run on too little data; HF exports with an untied head."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatcore import checkpoint
from chatcore.checkpoint import CheckpointError
from chatcore.model import GPT, GPTConfig
from chatcore.registry import Registry
from chatcore.testing import make_bot
from chatcore.training.job import RESUME_NAME, JobSpec, run_job
from chatcore.training.scheduler import JobScheduler
from tests.engine_fixtures import tiny_model, torch_threads

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "sample_conversations.jsonl"
SLOW = dict(max_iters=40, eval_interval=10, warmup_iters=2, batch_size=2, block_size=32,
            learning_rate=3e-3, min_lr=3e-4, patience=100, dropout=0.1)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


def tiny(seed: int = 0) -> GPT:
    return tiny_model(seed, block_size=128)


def jsonl(path: Path, lines: range) -> Path:
    rows = SAMPLE.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(rows[i] for i in lines) + "\n", encoding="utf-8")
    return path


def spec(models: Path, base: Path, data: Path, **train) -> JobSpec:
    return JobSpec(models_dir=str(models), base=str(base), jsonl=[str(data)], train={**SLOW, **train},
                   progress=False, threads=1)


def resume_iter(models: Path) -> int | None:
    path = models / RESUME_NAME
    if not path.is_file():
        return None
    return torch.load(str(path), map_location="cpu", weights_only=True)["iter"]


def candidates(models: Path) -> list[str]:
    return sorted(p.name for p in models.glob("finetuned_*.safetensors"))


# --- resume ------------------------------------------------------------------------------


def test_cancelled_job_resumes_from_its_last_evaluation(tmp_path, one_thread):
    from chatcore.training.train import Cancelled

    base = checkpoint.save(tiny(), tmp_path / "base")
    data = jsonl(tmp_path / "data.jsonl", range(0, 120))
    models = tmp_path / "models"
    with pytest.raises(Cancelled):  # cancelled right after the evaluation at iteration 20
        run_job(spec(models, base, data), should_stop=lambda: resume_iter(models) == 20)
    assert resume_iter(models) == 20 and candidates(models) == []  # kept out of sight of the registry
    result = run_job(spec(models, base, data))
    assert result["training"]["resumed_from"] == 20
    assert result["status"] in ("promoted", "rejected") and not (models / RESUME_NAME).exists()
    model, _ = checkpoint.load(result["candidate"])
    checkpoint.check_servable(model, result["candidate"])
    # the same run as one that was never stopped: same batches, dropout, optimizer state
    whole = run_job(spec(tmp_path / "models2", base, data))
    assert whole["training"]["resumed_from"] is None
    assert whole["training"]["best_val_loss"] == pytest.approx(result["training"]["best_val_loss"], abs=1e-5)
    other, _ = checkpoint.load(whole["candidate"])
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_state_from_other_data_or_options_is_ignored(tmp_path, one_thread):
    from chatcore.training.train import Cancelled

    base = checkpoint.save(tiny(), tmp_path / "base")
    models = tmp_path / "models"
    with pytest.raises(Cancelled):
        run_job(spec(models, base, jsonl(tmp_path / "a.jsonl", range(0, 120))),
                should_stop=lambda: resume_iter(models) == 10)
    other_data = run_job(spec(models, base, jsonl(tmp_path / "b.jsonl", range(120, 240))))
    assert other_data["training"]["resumed_from"] is None
    with pytest.raises(Cancelled):
        run_job(spec(models, base, tmp_path / "a.jsonl"), should_stop=lambda: resume_iter(models) == 10)
    other_options = run_job(spec(models, base, tmp_path / "a.jsonl", learning_rate=1e-3))
    assert other_options["training"]["resumed_from"] is None
    (models / RESUME_NAME).write_bytes(b"not a checkpoint")  # damaged: ignored, not fatal
    assert run_job(spec(models, base, tmp_path / "a.jsonl"))["training"]["resumed_from"] is None


@pytest.mark.slow  # two worker processes
def test_killed_job_resumes_and_ends_with_a_valid_candidate(tmp_path):
    base = checkpoint.save(tiny(), tmp_path / "base")
    data = jsonl(tmp_path / "data.jsonl", range(0, 120))
    models = tmp_path / "models"
    sched = JobScheduler(models, threads=1)
    job = sched.start(spec(models, base, data, max_iters=2000))
    end = time.monotonic() + 120
    while resume_iter(models) is None and job.running and time.monotonic() < end:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    assert job.wait(30)["status"] == "failed"
    killed_at = resume_iter(models)
    assert killed_at is not None and killed_at < 2000 and candidates(models) == []
    result = sched.start(spec(models, base, data, max_iters=2000)).wait(300)
    assert result["training"]["resumed_from"] >= killed_at  # its last evaluation (a later one if it got further)
    assert result["status"] in ("promoted", "rejected") and not (models / RESUME_NAME).exists()
    model, _ = checkpoint.load(result["candidate"])
    checkpoint.check_servable(model, result["candidate"])
    assert candidates(models) == [Path(result["candidate"]).name]


# --- leftovers of crashed fine-tunes --------------------------------------------------------


def leftovers(models: Path) -> tuple[set[str], set[str]]:
    """A registry that knows a promoted and a rejected candidate, plus what crashes leave; (kept, junk)."""
    models.mkdir(parents=True, exist_ok=True)
    promoted = checkpoint.save(tiny(1), models / "finetuned_20260101_000000")
    rejected = checkpoint.save(tiny(2), models / "finetuned_20260101_000001")
    Registry(models).promote(promoted)
    Registry(models).reject(rejected)
    orphan = checkpoint.save(tiny(3), models / "finetuned_20260101_000002")  # died before the gate
    no_sidecar = checkpoint.save(tiny(4), models / "finetuned_20260101_000003")
    checkpoint.sidecar_path(no_sidecar).unlink()
    (models / "finetuned_20260101_000004.json").write_text("{}")  # died between sidecar and weights
    (models / ".finetuned_20260101_000005.safetensors.0123abcd.tmp").write_bytes(b"\0" * 1000)
    (models / f".{RESUME_NAME}.0123abcd.tmp").write_bytes(b"\0" * 1000)
    kept = {promoted.name, promoted.with_suffix(".json").name, rejected.name, rejected.with_suffix(".json").name,
            "registry.json"}
    junk = {orphan.name, orphan.with_suffix(".json").name, no_sidecar.name, "finetuned_20260101_000004.json",
            ".finetuned_20260101_000005.safetensors.0123abcd.tmp", f".{RESUME_NAME}.0123abcd.tmp"}
    return kept, junk


def files(models: Path) -> set[str]:
    return {p.name for p in models.iterdir() if p.is_file() and not p.name.startswith(".registry")
            and p.name != ".finetune.lock"}


def test_scheduler_start_removes_what_crashed_fine_tunes_left(tmp_path):
    models = tmp_path / "models"
    kept, junk = leftovers(models)
    assert files(models) == kept | junk
    assert JobScheduler(models).clean()
    assert files(models) == kept
    assert Registry(models).current().stem == "finetuned_20260101_000000"


def test_garbage_registry_leaves_every_candidate_alone(tmp_path):
    models = tmp_path / "models"
    kept, junk = leftovers(models)
    (models / "registry.json").write_text("[1, 2")
    assert JobScheduler(models).clean()
    assert files(models) == (kept | junk) - {".finetuned_20260101_000005.safetensors.0123abcd.tmp",
                                              f".{RESUME_NAME}.0123abcd.tmp"}


async def test_plugin_start_removes_what_crashed_fine_tunes_left(tmp_path):
    models = tmp_path / "models"
    kept, junk = leftovers(models)
    bot = make_bot(tmp_path, config={"plugins": {"auto_finetune": {"enabled": False}}})
    try:
        for r in bot.pm.hook.startup(bot=bot):
            if inspect.isawaitable(r):
                await r
    except CheckpointError:
        pass  # the promoted tiny model does not fit the scripted bot; not what this test is about
    finally:
        await bot.close()
    assert files(models) == kept


@pytest.mark.slow  # the real command in its own process
def test_finetune_command_warns_below_ten_exchanges_cleans_leftovers_and_trains(tmp_path):
    base = checkpoint.save(tiny(), tmp_path / "base")
    models = tmp_path / "data" / "models"
    kept, junk = leftovers(models)
    config = tmp_path / "bot.yaml"
    config.write_text(
        f"bot:\n  data_dir: {tmp_path / 'data'}\n"
        f"model:\n  checkpoint: {base}\n  device: cpu\n"
        "plugins:\n  auto_finetune:\n    threads: 1\n    training:\n"
        "      max_iters: 4\n      eval_interval: 2\n      warmup_iters: 1\n      block_size: 32\n"
    )
    data = jsonl(tmp_path / "few.jsonl", range(0, 6))
    proc = subprocess.run([sys.executable, "-m", "chatcore.cli", "finetune", "-c", str(config), "--no-store",
                           "--jsonl", str(data), "--json"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fewer than 10" in proc.stderr and "overfit" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["data"]["train_exchanges"] + result["data"]["val_exchanges"] < 10
    assert junk.isdisjoint(files(models)) and kept <= files(models)


# --- Hugging Face exports whose head is not the embedding ------------------------------------


def test_hf_export_with_untied_head_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    from chatcore.hf import load_hf_dir

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=50257,
                                  tie_word_embeddings=False)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "untied")
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_hf_dir(tmp_path / "untied")
    # the same weights tied: loads, and gives the Hugging Face model's logits
    cfg.tie_word_embeddings = True
    tied = transformers.GPT2LMHeadModel(cfg).eval()
    tied.save_pretrained(tmp_path / "tied")
    model, _ = load_hf_dir(tmp_path / "tied")
    idx = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][0, -1], tied(idx).logits[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("when", ["after training", "during the gate"])
def test_a_cancel_after_the_last_step_writes_and_promotes_nothing(tmp_path, one_thread, monkeypatch, when):
    """SIGTERM once training is over (a job's last seconds) still cancels: no candidate, registry untouched."""
    from chatcore.training import gate, train as train_module
    from chatcore.training.train import Cancelled

    base = checkpoint.save(tiny(), tmp_path / "base")
    data = jsonl(tmp_path / "data.jsonl", range(0, 60))
    models = tmp_path / "models"
    stop = {"flag": False}
    target, name = (train_module, "train") if when == "after training" else (gate, "judge_file")
    original = getattr(target, name)

    def then_signal(*args, **kwargs):  # the signal handler sets the flag while this step runs
        result = original(*args, **kwargs)
        stop["flag"] = True
        return result

    monkeypatch.setattr(target, name, then_signal)
    with pytest.raises(Cancelled):
        run_job(spec(models, base, data, max_iters=4, eval_interval=2), should_stop=lambda: stop["flag"])
    assert candidates(models) == [] and not list(models.glob("finetuned_*.json"))
    assert Registry(models).current() is None
