"""SIGTERM to `chatcore run`: the request in flight finishes, shutdown hooks run, exit 0 (issue 17, item 15)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from chatcore.store import Store

# `chatcore run` itself (cli.main), with the model replaced by a slow scripted one and a plugin that
# records the shutdown hook: what is under test is the process's signal handling, not the model.
RUNNER = textwrap.dedent('''
    import sys
    from chatcore import bot, hookimpl, plugin_manager
    from chatcore.cli import main
    from chatcore.testing import ScriptedEngine

    bot.load_engine = lambda config: ScriptedEngine(["one two three four five six seven eight"], delay=0.25)

    class Marker:
        @hookimpl
        def shutdown(self, bot):
            open(sys.argv[2], "w").write("shutdown ran")

    make = plugin_manager.make_plugin_manager
    plugin_manager.make_plugin_manager = lambda extra=(), **kw: make([*extra, Marker()], **kw)
    sys.exit(main(["run", "-c", sys.argv[1]]))
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_the_request_in_flight_then_runs_shutdown_hooks(tmp_path: Path):
    port = free_port()
    config = tmp_path / "bot.yaml"
    config.write_text(f"bot: {{data_dir: {json.dumps(str(tmp_path))}}}\n"
                      f"adapters: {{http: {{enabled: true, host: 127.0.0.1, port: {port}}}}}\n")
    marker = tmp_path / "shutdown.txt"
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.Popen([sys.executable, str(runner), str(config), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the bot did not start: {proc.stdout.read().decode()}") from None
                time.sleep(0.1)
        answer: dict = {}

        def ask() -> None:
            try:
                answer["result"] = request(f"{url}/chat", {"message": "hello", "user": "ann"})
            except Exception as exc:  # recorded, asserted below
                answer["result"] = exc

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(0.6)  # the reply takes 2 s: it is being generated now
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        asking.join(10)
        output = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, output
    assert answer["result"] == (200, {"response": "one two three four five six seven eight"})
    assert marker.read_text() == "shutdown ran"
    with Store(tmp_path / "history.db") as store:
        assert [e.user_text for e in store.exchanges()] == ["hello"]
