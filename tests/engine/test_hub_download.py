"""The download path (GPT-2 from the Hugging Face hub) against a fake hub on 127.0.0.1.

The fake serves what huggingface_hub's `hf_hub_download` asks for (HEAD and GET of
`/{repo}/resolve/{revision}/{file}`, with the X-Repo-Commit / ETag /
Content-Length headers, and Range for resumed downloads): a small GPT-2 written
by transformers' `save_pretrained`. `chatcore chat` runs in a subprocess with
HF_ENDPOINT pointing at it, as a user's first start would.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves `files` as repo `gpt2` at any revision; records every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str]] = []
        self.drop_at: int | None = None  # close the connection after this many bytes of the weights
        self.corrupt = False  # serve the weights with flipped bytes (same size and ETag)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, body=False)

            def do_GET(self):
                hub.handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def etag(self, name: str) -> str:
        data = self.files[name]
        if name.endswith((".safetensors", ".bin")):  # LFS files: the ETag is the content's sha256
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((req.command, req.path))
        parts = req.path.split("?")[0].strip("/").split("/")
        if len(parts) != 4 or parts[0] != "gpt2" or parts[1] != "resolve" or parts[3] not in self.files:
            req.send_response(404)
            req.send_header("X-Error-Code", "EntryNotFound" if parts[:2] == ["gpt2", "resolve"] else "RepoNotFound")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        name = parts[3]
        data = self.files[name]
        if self.corrupt and name == "model.safetensors":
            data = data[:-64] + bytes(b ^ 0xFF for b in data[-64:])
        start = 0
        rng = req.headers.get("Range")
        if body and rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", COMMIT)
        req.send_header("ETag", f'"{self.etag(name)}"')
        req.send_header("Content-Length", str(len(data) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if not body:
            return
        end = len(data)
        if self.drop_at is not None and name == "model.safetensors":
            end = max(start, self.drop_at)
        req.wfile.write(data[start:end])
        req.wfile.flush()
        if end < len(data):
            req.close_connection = True
            req.connection.shutdown(2)  # the connection drops mid-file

    def downloads(self) -> int:
        return len(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> dict[str, bytes]:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out, safe_serialization=True)
    return {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture
def hub(gpt2_files):
    server = FakeHub(dict(gpt2_files))
    yield server
    server.close()


@pytest.fixture
def user(tmp_path):
    """A new user's environment: empty HOME, the hub at the fake, nothing offline."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "bot.yaml").write_text(
        f"bot:\n  data_dir: {tmp_path / 'data'}\n"
        "model:\n  base: gpt2\n  device: cpu\n  starter: false\n"
        "generation:\n  max_new_tokens: 5\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "CHATCORE_"))}
    env.update(HOME=str(home), HF_HOME=str(home / ".cache" / "huggingface"))
    return tmp_path, env


def chat(user, hub, text="hi\nhow are you?\n", terminal=False) -> subprocess.CompletedProcess:
    """`chatcore chat` with piped input; ``terminal``: its stderr is a terminal, as a user's is."""
    tmp_path, env = user
    env = dict(env, HF_ENDPOINT=hub.url)
    argv = [sys.executable, "-m", "chatcore.cli", "chat", "-c", str(tmp_path / "bot.yaml")]
    if not terminal:
        return subprocess.run(argv, input=text, capture_output=True, text=True, env=env, timeout=300)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing at 0 columns
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave, env=env, text=True)
    os.close(slave)
    err = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            err.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(text, timeout=300)
    reader.join(10)
    os.close(master)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err.decode("utf-8", "replace"))


def snapshot_files(user) -> list[Path]:
    tmp_path, env = user
    return sorted(Path(env["HF_HOME"]).rglob("snapshots/*/*"))


def test_first_start_downloads_with_a_progress_bar_then_the_cache_serves_offline(user, hub):
    first = chat(user, hub, terminal=True)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 2  # one reply per line
    assert ("GET", f"/gpt2/resolve/main/model.safetensors") in hub.requests
    assert "model.safetensors" in first.stderr and "100%" in first.stderr  # huggingface_hub's progress bar
    before = hub.downloads()
    second = chat(user, hub)
    assert second.returncode == 0, second.stderr
    assert len(second.stdout.splitlines()) == 2
    assert hub.downloads() == before  # the second start never asked the hub


def test_an_interrupted_download_fails_clearly_and_a_retry_succeeds(user, hub, gpt2_files):
    hub.drop_at = len(gpt2_files["model.safetensors"]) // 2
    failed = chat(user, hub)
    assert failed.returncode == 1
    assert "gpt2" in failed.stderr and "download" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not any(p.name == "model.safetensors" for p in snapshot_files(user))  # nothing half-written to load
    hub.drop_at = None
    retried = chat(user, hub)
    assert retried.returncode == 0, retried.stderr
    assert len(retried.stdout.splitlines()) == 2


def test_a_corrupt_download_names_the_file_and_is_never_loaded(user, hub):
    hub.corrupt = True
    failed = chat(user, hub)
    assert failed.returncode == 1
    assert "model.safetensors" in failed.stderr and "corrupt" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not any(p.name == "model.safetensors" for p in snapshot_files(user))
    hub.corrupt = False
    again = chat(user, hub)  # the bad copy was not kept: the next start downloads it afresh
    assert again.returncode == 0, again.stderr


def test_a_download_with_a_broken_header_names_the_file(user, hub, gpt2_files):
    data = gpt2_files["model.safetensors"]
    hub.files["model.safetensors"] = (10**9).to_bytes(8, "little") + data[8:]  # header length past the end
    failed = chat(user, hub)
    assert failed.returncode == 1
    assert "model.safetensors" in failed.stderr and "Traceback" not in failed.stderr
