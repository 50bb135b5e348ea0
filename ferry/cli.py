"""Entry point of the `ferry` command: the app lives in ferry.commands, each module adds its subcommands."""

from __future__ import annotations

from ferry.commands import app
from ferry.commands import bench as _bench  # noqa: F401, I001  (registers the bench group)
from ferry.commands import edge as _edge  # noqa: F401, I001  (registers cloud, edge, linkem)
from ferry.commands import generate as _generate  # noqa: F401  (registers generate, chat) -- first in --help
from ferry.commands import plan as _plan  # noqa: F401  (registers plan, topo)
from ferry.commands import serve as _serve  # noqa: F401, I001  (registers serve)

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="ferry")  # also under `python -m ferry.cli`, so usage lines show the command people type


if __name__ == "__main__":
    main()
