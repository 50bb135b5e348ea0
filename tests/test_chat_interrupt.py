"""`ferry chat` and Ctrl-C: SIGINT while the model answers stops that answer and returns to the prompt; SIGINT at
the prompt, or end of input (Ctrl-D), quits with status 0; /reset confirms. Every wait is on output the chat
prints (a line or streamed text), each with a deadline: no sleeps stand in for synchronisation."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

DEADLINE_S = 180


class Chat:
    """A `ferry chat` subprocess whose stdout and stderr are read by threads into one queue of (stream, text)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ferry.cli", "chat", "--device", "cpu", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"})
        self.chunks: queue.Queue[tuple[str, str]] = queue.Queue()
        self.seen = {"out": "", "err": ""}
        for name, pipe in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(name, pipe), daemon=True).start()

    def _pump(self, name, pipe) -> None:
        while chunk := pipe.read1(4096):
            self.chunks.put((name, chunk.decode("utf-8", "replace")))

    def wait_for(self, stream: str, text: str, after: int = 0) -> int:
        """Block until `text` appears in `stream` past offset `after`; return the offset just past it."""
        deadline = time.monotonic() + DEADLINE_S
        while (at := self.seen[stream].find(text, after)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None and self.chunks.empty():
                pytest.fail(f"no {text!r} on std{stream}; saw stdout {self.seen['out']!r} stderr {self.seen['err']!r}")
            try:
                name, chunk = self.chunks.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            self.seen[name] += chunk
        return at + len(text)

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def chat():
    session = Chat("--max-tokens", "512")
    yield session
    session.close()


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_then_the_chat_goes_on_and_ctrl_c_at_the_prompt_quits(chat):
    chat.wait_for("err", "Ctrl-C stops an answer")  # loaded
    chat.send(b"Write a very long story about a dragon who learns to bake bread.\n")
    start = chat.wait_for("out", "assistant> ")
    chat.wait_for("out", " ", after=start)  # the answer is streaming: some of its text has arrived
    chat.interrupt()
    chat.wait_for("err", "answer stopped")
    prompt = chat.wait_for("out", "you> ", after=start)

    chat.send(b"What is the capital of France?\n")
    answer = chat.wait_for("out", "assistant> ", after=prompt)
    chat.wait_for("out", "Paris", after=answer)  # the stopped turn left no trace that derails the next one
    prompt = chat.wait_for("out", "you> ", after=answer)

    chat.send(b"/reset\n")
    chat.wait_for("err", "conversation cleared")
    chat.wait_for("out", "you> ", after=prompt)
    chat.interrupt()  # at the prompt: quit
    assert chat.proc.wait(DEADLINE_S) == 0, chat.seen
    assert "Traceback" not in chat.seen["err"] and "interrupted" not in chat.seen["err"]


@pytest.mark.slow
def test_end_of_input_quits_and_bytes_that_are_not_utf8_get_an_answer(chat):
    chat.wait_for("err", "Ctrl-C stops an answer")
    chat.send(b"Say hello to caf\xc3( please\n")  # a cut UTF-8 character in the line
    answer = chat.wait_for("out", "assistant> ")
    chat.wait_for("out", "you> ", after=answer)
    chat.proc.stdin.close()  # Ctrl-D
    assert chat.proc.wait(DEADLINE_S) == 0
    assert "Traceback" not in chat.seen["err"]
