"""`chatcore chat` end to end with the real engine: piped lines in, one reply line each, history saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from chatcore import checkpoint
from chatcore.model import GPT, GPTConfig
from chatcore.store import Store


def tiny_model_config(tmp_path, max_new_tokens: int, more: str = ""):
    """A bot config serving a tiny random model from a checkpoint in `tmp_path` (one thread, the CPU)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    ckpt = checkpoint.save(model, tmp_path / "tiny", base_model="random-test")
    config = tmp_path / "bot.yaml"
    config.write_text(
        f"bot:\n  data_dir: {tmp_path / 'data'}\n"
        f"model:\n  checkpoint: {ckpt}\n  device: cpu\n  threads: 1\n"
        f"generation:\n  max_new_tokens: {max_new_tokens}\n" + more
    )
    return config


def test_piped_chat_with_a_real_model(tmp_path):
    config = tiny_model_config(tmp_path, 12)
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


# Runs `chatcore chat` as the cold start benchmark does, then says what it imported and which of the
# collector's full scans walked torch's objects (every one before they were frozen).
PROBE = r"""
import gc, json, sys
over_torch = []

def watch(phase, info):
    if phase == "start" and info["generation"] == 2 and "torch" in sys.modules and gc.get_freeze_count() == 0:
        over_torch.append(len(sys.modules))

gc.callbacks.append(watch)
from chatcore.cli import main
rc = main(["chat", "-c", sys.argv[1]])
print(json.dumps({"rc": rc, "full_scans_over_torch": len(over_torch),
                  "imported": sorted(m for m in ("discord", "slack_bolt", "slack_sdk", "chatcore.dashboard", "aiohttp")
                                    if m in sys.modules)}),
      file=sys.stderr)
"""


@pytest.fixture(scope="module")
def chat_start(tmp_path_factory):
    # Discord, Slack and HTTP written in the config, but disabled: their sections are still validated.
    config = tiny_model_config(tmp_path_factory.mktemp("cold"), 4, "adapters:\n  discord:\n    enabled: false\n"
                               "    token: x\n  slack:\n    enabled: false\n    mode: socket\n"
                               "  http:\n    enabled: false\n    port: 8081\n    trusted_proxies: [10.0.0.0/8]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(config)], input=b"hi\n", capture_output=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr.decode()
    assert len(out.stdout.decode().splitlines()) == 1
    return json.loads(out.stderr.decode().strip().splitlines()[-1])


def test_chat_does_not_import_disabled_platform_libraries(chat_start):
    assert not {"discord", "slack_bolt", "slack_sdk"} & set(chat_start["imported"])


def test_chat_does_not_import_aiohttp(chat_start):
    # ~0.2 s of every start: only the HTTP adapter's server, the dashboard and a front end's
    # engine (chatcore.remote) need it, once they run.
    assert "aiohttp" not in chat_start["imported"]


def test_chat_does_not_import_the_disabled_dashboard(chat_start):
    assert "chatcore.dashboard" not in chat_start["imported"]


def test_no_full_garbage_collection_walks_torchs_objects_at_start(chat_start):
    # Each one walked ~10^6 objects that live as long as the process (~0.1-0.15 s): 3 of them made every start slower.
    assert chat_start["full_scans_over_torch"] == 0
