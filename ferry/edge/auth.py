"""The shared token both sides present: from FERRY_TOKEN or a file, never from the command line."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from ferry.errors import FerryError

ENV = "FERRY_TOKEN"


def load_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise FerryError(f"cannot read token file {str(token_file)!r}: {exc.strerror}") from None
    else:
        token = os.environ.get(ENV, "").strip()
    if not token:
        raise FerryError(f"no shared token: set {ENV} or pass --token-file PATH")
    return token


def token_matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
