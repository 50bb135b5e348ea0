"""The chat prompt's line reader: Ctrl-C at the prompt is never lost.

`input()` on a pipe writes the prompt and then blocks in read(); a SIGINT that lands between the two (a program
driving the chat sends it as soon as the prompt appears) only sets CPython's flag, the read never sees EINTR, and
the chat waits for input forever (the chat-interrupt test hung about one run in six, before and after the serving
engine). Here a signal also writes a byte to a wakeup pipe, and the reader waits on stdin and that pipe together,
so a signal arriving at any moment ends the wait and raises KeyboardInterrupt. A terminal keeps `input()` and its
line editing: a person cannot hit that window.
"""

from __future__ import annotations

import os
import select
import signal
import sys


class PipeLineReader:
    """`readline(prompt)` over a non-terminal stdin: a line without its newline; EOFError at end of input."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def readline(self, prompt: str) -> str:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.fd, self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 512)  # a signal arrived: its Python handler runs as this call returns
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if self._pending:
                    break
                raise EOFError
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        # Bytes that are not UTF-8 reach the tokenizer as their byte tokens (surrogateescape).
        return line.decode("utf-8", "surrogateescape")

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)


def prompt_reader():
    """A `readline(prompt)` for the chat loop: `input` on a terminal, the signal-safe pipe reader otherwise."""
    if sys.stdin.isatty():
        return input, None
    reader = PipeLineReader(sys.stdin.fileno())
    return reader.readline, reader
