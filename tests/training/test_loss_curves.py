"""A fine-tune's sidecar keeps its per-evaluation train/val losses: the dashboard's learning curves."""

from __future__ import annotations

import json

from chatcore import checkpoint
from chatcore.store import Store
from chatcore.training.job import JobSpec, run_job

from .test_loop import FAST, tiny


def test_the_candidate_sidecar_records_the_loss_curve(tmp_path, sample_conversations):
    base = checkpoint.save(tiny(), tmp_path / "base", base_model="random-test")
    with Store(tmp_path / "history.db") as store:
        store.import_jsonl(sample_conversations)
    spec = JobSpec(models_dir=str(tmp_path / "models"), base=str(base), store=str(tmp_path / "history.db"),
                   train={**FAST, "max_iters": 10, "eval_interval": 5}, progress=False, threads=1)
    result = run_job(spec)
    side = json.loads(checkpoint.sidecar_path(result["candidate"]).read_text())
    history = side["provenance"]["history"]
    assert [h["iter"] for h in history] == [0, 5, 10]
    assert all("val_loss" in h for h in history) and all("train_loss" in h for h in history[1:])
    assert history == result["history"]
