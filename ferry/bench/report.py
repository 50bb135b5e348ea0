"""Result files every benchmark writes: JSON with device, date, command and git commit, plus a markdown table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """HEAD (with -dirty), or FERRY_GIT_COMMIT where the tree was copied without its .git (a remote machine)."""
    if os.environ.get("FERRY_GIT_COMMIT"):
        return os.environ["FERRY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        # Result files themselves do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(device)}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again anywhere: the CLI as `ferry`, scripts relative to the repository
    (no machine's paths in result files)."""
    argv = list(sys.argv if argv is None else argv)
    root = Path(__file__).resolve().parents[2]
    if argv and (Path(argv[0]).name == "ferry" or Path(argv[0]).resolve() == root / "ferry" / "cli.py"):
        words = ["ferry", *argv[1:]]
    else:
        words = ["python", *argv]
    for i, word in enumerate(words):
        path = Path(word)
        if path.is_absolute() and path.resolve().is_relative_to(root):
            words[i] = str(path.resolve().relative_to(root))
    return " ".join(shlex.quote(w) for w in words)


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_description(device),
        "date": dt.date.today().isoformat(),
        "command": command_line(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
    }


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
                  notes: str = "") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    header = "\n".join(f"- {k}: `{v}`" for k, v in meta.items() if not isinstance(v, (dict, list)))
    md_path.write_text(f"# {stem}\n\n{header}\n\n{markdown_table(rows, columns)}\n\n{notes}\n".rstrip() + "\n")
    return json_path, md_path
