"""Result files name the command so anyone can run it again: the CLI as `ferry`, scripts relative to the repo."""

from __future__ import annotations

from pathlib import Path

from ferry.bench.report import command_line

ROOT = Path(__file__).resolve().parents[1]


def test_commands_in_result_files_carry_no_machine_paths():
    assert command_line([str(ROOT / "ferry" / "cli.py"), "bench", "host"]) == "ferry bench host"
    assert command_line(["/some/venv/bin/ferry", "bench", "edge", "--out", "x y"]) == "ferry bench edge --out 'x y'"
    assert command_line([str(ROOT / "benchmarks" / "decode.py"), "--device", "cpu"]) == \
        "python benchmarks/decode.py --device cpu"
    assert command_line(["benchmarks/tp_decode.py", "--tp", "2"]) == "python benchmarks/tp_decode.py --tp 2"
