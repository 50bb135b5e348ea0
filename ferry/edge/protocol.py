"""The edge <-> cloud wire format: versioned frames carried as raw bytes inside one gRPC bidirectional stream.

Frame = 32-byte header + JSON metadata (control frames only) + binary body:

    magic "FRRY" | version u8 | kind u8 | flags u16 | session u64 | request u64 | meta_len u32 | body_len u32

Control frames (HELLO, WELCOME, REQUEST, ERROR) carry JSON; the per-token frames (HIDDEN, TOKEN) carry only packed
binary fields so a decode step costs a header plus the encoded hidden state. Anything that does not parse raises
ProtocolError; the server answers it with an ERROR frame and closes that stream.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ferry.errors import FerryError

MAGIC = b"FRRY"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQII")
HIDDEN_FIELDS = struct.Struct("<II")  # start position, tokens
TOKEN_FIELDS = struct.Struct("<iIf")  # token id, position it was sampled for, cloud compute ms
VERDICT_FIELDS = struct.Struct("<Iif")  # drafts accepted, the token after them, cloud compute ms
MAX_DRAFT = 64
MAX_META_BYTES = 64 * 1024
FLAG_NO_REPLY = 1  # HIDDEN: a prefill chunk that is not the last; the cloud caches it and answers nothing

SERVICE = "ferry.edge.v1.Link"
METHOD = f"/{SERVICE}/Session"


class ProtocolError(FerryError):
    """A frame that is malformed, truncated, oversized or out of order."""


class Kind(IntEnum):
    HELLO = 1  # edge -> cloud: model fingerprint, split, codec
    WELCOME = 2  # cloud -> edge: accepted, limits
    REQUEST = 3  # edge -> cloud: a new request id with its sampling parameters
    HIDDEN = 4  # edge -> cloud: encoded hidden states of positions [start, start + tokens)
    TOKEN = 5  # cloud -> edge: the token sampled after the last hidden state
    END = 6  # edge -> cloud: request finished
    ERROR = 7  # either way: what was wrong; the stream closes after it
    VERIFY = 8  # edge -> cloud: hidden states of pending tokens + drafted tokens, and the draft ids
    VERDICT = 9  # cloud -> edge: how many drafts the target agrees with, and its own next token
    PING = 10  # edge -> cloud, before HELLO: probes the link (any body up to the frame limit)
    PONG = 11  # cloud -> edge: body size echoed in meta, plus the cloud's per-layer compute profile


@dataclass
class Frame:
    kind: Kind
    session: int = 0
    request: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    flags: int = 0

    def encode(self) -> bytes:
        meta = json.dumps(self.meta, separators=(",", ":")).encode() if self.meta else b""
        header = HEADER.pack(MAGIC, VERSION, self.kind, self.flags, self.session, self.request, len(meta), len(self.body))
        return header + meta + self.body

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        if len(data) < HEADER.size:
            raise ProtocolError(f"frame of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
        magic, version, kind, flags, session, request, meta_len, body_len = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError("not a Ferry frame (bad magic)")
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
        try:
            kind = Kind(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        if meta_len > MAX_META_BYTES or HEADER.size + meta_len + body_len != len(data):
            raise ProtocolError(f"frame lengths (meta {meta_len}, body {body_len}) do not match its {len(data)} bytes")
        meta: dict[str, Any] = {}
        if meta_len:
            try:
                meta = json.loads(data[HEADER.size : HEADER.size + meta_len])
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"frame metadata is not JSON ({exc})") from None
            if not isinstance(meta, dict):
                raise ProtocolError("frame metadata must be a JSON object")
        return cls(kind, session, request, meta, bytes(data[HEADER.size + meta_len :]), flags)

    # --- typed helpers for the binary frames ---------------------------------------------------------

    @classmethod
    def hidden(cls, session: int, request: int, start: int, tokens: int, payload: bytes, reply: bool = True) -> Frame:
        return cls(Kind.HIDDEN, session, request, body=HIDDEN_FIELDS.pack(start, tokens) + payload,
                   flags=0 if reply else FLAG_NO_REPLY)

    def hidden_fields(self) -> tuple[int, int, bytes]:
        if len(self.body) < HIDDEN_FIELDS.size:
            raise ProtocolError("HIDDEN frame too short")
        start, tokens = HIDDEN_FIELDS.unpack_from(self.body)
        return start, tokens, self.body[HIDDEN_FIELDS.size :]

    @classmethod
    def token(cls, session: int, request: int, token_id: int, position: int, cloud_ms: float) -> Frame:
        return cls(Kind.TOKEN, session, request, body=TOKEN_FIELDS.pack(token_id, position, cloud_ms))

    def token_fields(self) -> tuple[int, int, float]:
        return self._fixed_body(TOKEN_FIELDS)

    @classmethod
    def verify(cls, session: int, request: int, start: int, tokens: int, draft: list[int], payload: bytes) -> Frame:
        body = HIDDEN_FIELDS.pack(start, tokens) + struct.pack(f"<I{len(draft)}i", len(draft), *draft) + payload
        return cls(Kind.VERIFY, session, request, body=body)

    def verify_fields(self) -> tuple[int, int, list[int], bytes]:
        start, tokens, rest = self.hidden_fields()
        if len(rest) < 4:
            raise ProtocolError("VERIFY frame too short")
        (n,) = struct.unpack_from("<I", rest)
        if n < 1 or n > MAX_DRAFT or n >= tokens or len(rest) < 4 + 4 * n:
            raise ProtocolError(f"VERIFY frame with {n} drafts over {tokens} tokens is malformed")
        draft = list(struct.unpack_from(f"<{n}i", rest, 4))
        return start, tokens, draft, rest[4 + 4 * n :]

    @classmethod
    def verdict(cls, session: int, request: int, accepted: int, token_id: int, cloud_ms: float) -> Frame:
        return cls(Kind.VERDICT, session, request, body=VERDICT_FIELDS.pack(accepted, token_id, cloud_ms))

    def verdict_fields(self) -> tuple[int, int, float]:
        return self._fixed_body(VERDICT_FIELDS)

    def _fixed_body(self, fields: struct.Struct) -> tuple:
        """A body that is exactly one struct (TOKEN, VERDICT): any other length is malformed."""
        if len(self.body) != fields.size:
            raise ProtocolError(f"{self.kind.name} frame has the wrong size")
        return fields.unpack(self.body)

    @classmethod
    def error(cls, message: str, session: int = 0, request: int = 0) -> Frame:
        return cls(Kind.ERROR, session, request, meta={"error": message})


def model_fingerprint(config) -> dict[str, Any]:
    """What both sides must agree on before hidden states mean the same thing."""
    return {
        "architecture": config.architecture,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
    }
