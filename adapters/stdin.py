"""The terminal adapter: chat on stdin/stdout.

Interactive (a TTY): a prompt, and replies streamed as they are generated.
Piped (``printf 'hi\\nbye\\n' | chatcore chat``): one reply line per input line,
exit 0 at end of input. Input bytes that are not UTF-8 are replaced, never fatal.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
from pathlib import Path
from typing import IO, Any

from chatcore import Message, hookimpl
from chatcore.adapter import Adapter, BotSurface
from chatcore.config import Field
from chatcore.message import BUSY_REPLY, Busy, RateLimited


class StdinAdapter(Adapter):
    name = "stdin"
    config_schema = {
        "user": Field(str, None, help="Your user id in the history (default: your login name)."),
        "operator_is_admin": Field(bool, True, help="Whoever types here may run admin commands."),
        "stream": Field(bool, True, help="Print replies token by token when interactive."),
        "exports_dir": Field(str, ".", help="Where files a reply carries (/mydata) are written."),
    }

    def __init__(self, bot: BotSurface, config: dict[str, Any], *, stdin: IO[bytes] | None = None,
                 stdout: IO[str] | None = None) -> None:
        super().__init__(bot, config)
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.stdout = stdout if stdout is not None else sys.stdout
        self.interactive = stdin is None and sys.stdin.isatty() and sys.stdout.isatty()
        self.user = config.get("user") or _login_name()
        self._stopped = asyncio.Event()
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: end of input (or stop)

    async def start(self) -> None:
        lines = self._lines
        loop = asyncio.get_running_loop()

        def read() -> None:  # a daemon thread, so Ctrl-C never waits for a blocked readline
            try:
                for raw in iter(self.stdin.readline, b""):
                    loop.call_soon_threadsafe(lines.put_nowait, raw)
            finally:
                loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, name="chatcore-stdin", daemon=True).start()
        if self.interactive:
            self._write(f"Chatting with {self.bot.name} ({self.bot.engine.model_id}). /help for commands, Ctrl-D to quit.\n")
        while not self._stopped.is_set():
            if self.interactive:
                self._write("you> ")
            raw = await lines.get()
            if raw is None:
                break
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text.strip():
                continue
            await self._answer(text)
        if self.interactive:
            self._write("\n")

    async def _answer(self, text: str) -> None:
        message = Message(text=text, adapter=self.name, channel="terminal", user=self.user, is_direct=True)
        streaming = self.interactive and self.config.get("stream", True)
        if streaming:
            self._write("bot> ")
        started = False

        def on_delta(delta: str) -> None:
            nonlocal started
            started = True
            self._write(delta)

        try:
            reply = await self.bot.handle(message, on_delta=on_delta if streaming else None)
        except Busy:
            self._write(("\n" if started else "") + BUSY_REPLY + "\n")
            return
        except RateLimited as refused:
            if refused.notice:
                self._write(refused.notice + "\n")
            return
        text_out = reply.text if reply else ""
        for f in reply.files if reply else ():
            text_out += f"\n{f.name} written to {self._save(f)}"
        if streaming and started and reply is not None and reply.from_model:
            self._write("\n")  # already streamed (a rewrite by a plugin shows in the history, not twice here)
        else:
            self._write(text_out + "\n")

    def _save(self, file: Any) -> Path:
        """A terminal cannot take an attachment: the file goes into `exports_dir`."""
        folder = Path(self.config.get("exports_dir") or ".").expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(file.name).name
        path.write_bytes(file.data)
        return path

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    async def stop(self) -> None:
        self._stopped.set()
        self._lines.put_nowait(None)  # wake a start() waiting for input (SIGTERM while nobody types)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "operator"


@hookimpl
def register_adapters(register):
    register("stdin", StdinAdapter)
