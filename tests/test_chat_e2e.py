"""`chatcore chat` end to end with the real engine: piped lines in, one reply line each, history saved."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.store import Store


def test_piped_chat_with_a_real_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    ckpt = checkpoint.save(model, tmp_path / "tiny", base_model="random-test")
    config = tmp_path / "bot.yaml"
    config.write_text(
        f"bot:\n  data_dir: {tmp_path / 'data'}\n"
        f"model:\n  checkpoint: {ckpt}\n  device: cpu\n  threads: 1\n"
        "generation:\n  max_new_tokens: 12\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "chatcore.cli", "chat", "-c", str(config)],
                         input="hi\nbye\n".encode(), capture_output=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr.decode()
    assert len(out.stdout.decode().splitlines()) == 2  # one line per input line, even for gibberish
    with Store(tmp_path / "data" / "history.db") as store:
        texts = [e.user_text for e in store.exchanges()]
        models = {e.model_id for e in store.exchanges()}
    # an exchange is logged whenever the model produced some text
    assert set(texts) <= {"hi", "bye"}
    assert all(m and "tiny" in m for m in models)


def test_missing_model_is_a_clear_error(tmp_path):
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot:\n  data_dir: {tmp_path}\nmodel:\n  checkpoint: {tmp_path / 'nope.safetensors'}\n")
    out = subprocess.run([sys.executable, "-m", "chatcore.cli", "chat", "-c", str(config)], input=b"hi\n",
                         capture_output=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    err = out.stderr.decode()
    assert "model.checkpoint" in err and "Traceback" not in err
