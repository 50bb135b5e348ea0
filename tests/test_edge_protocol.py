"""Wire frames: round trips, and every kind of malformed frame raises ProtocolError."""

from __future__ import annotations

import struct

import pytest

from ferry.edge.protocol import HEADER, MAGIC, Frame, Kind, ProtocolError


def test_frames_round_trip():
    for frame in (
        Frame(Kind.HELLO, 0, 0, meta={"split": 3, "codec": "int8"}),
        Frame.hidden(7, 9, 12, 3, b"\x01\x02\x03"),
        Frame.token(7, 9, 42, 15, 1.5),
        Frame.error("nope", 7, 9),
    ):
        back = Frame.decode(frame.encode())
        assert (back.kind, back.session, back.request, back.meta, back.body) == (
            frame.kind, frame.session, frame.request, frame.meta, frame.body)
    assert Frame.decode(Frame.token(1, 2, 42, 15, 1.5).encode()).token_fields() == (42, 15, 1.5)
    assert Frame.decode(Frame.hidden(1, 2, 12, 3, b"abc").encode()).hidden_fields() == (12, 3, b"abc")


def _header(magic=MAGIC, version=1, kind=int(Kind.HELLO), meta_len=0, body_len=0) -> bytes:
    return HEADER.pack(magic, version, kind, 0, 1, 1, meta_len, body_len)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than"),
        (b"FRRY", "shorter than"),
        (_header(magic=b"HTTP"), "bad magic"),
        (_header(version=9), "version 9"),
        (_header(kind=99), "unknown frame kind"),
        (_header(body_len=10) + b"short", "do not match"),
        (_header(meta_len=5) + b"{oops", "not JSON"),
        (_header(meta_len=2) + b"[]", "JSON object"),
    ],
)
def test_malformed_frames_raise_protocol_error(data, message):
    with pytest.raises(ProtocolError, match=message):
        Frame.decode(data)


def test_binary_frames_check_their_field_sizes():
    with pytest.raises(ProtocolError):
        Frame(Kind.TOKEN, body=struct.pack("<i", 3)).token_fields()
    with pytest.raises(ProtocolError):
        Frame(Kind.HIDDEN, body=b"\x00").hidden_fields()


def test_verify_and_verdict_frames_round_trip():
    frame = Frame.decode(Frame.verify(3, 4, 10, 3, [7, -1], b"payload").encode())
    assert frame.verify_fields() == (10, 3, [7, -1], b"payload")
    assert Frame.decode(Frame.verdict(3, 4, 2, 99, 1.5).encode()).verdict_fields() == (2, 99, 1.5)


def _verify_body(start: int, tokens: int, count: int, draft: list[int], tail: bytes = b"") -> bytes:
    return struct.pack("<III", start, tokens, count) + struct.pack(f"<{len(draft)}i", *draft) + tail


@pytest.mark.parametrize(
    "body, message",
    [
        (b"\x00" * 4, "HIDDEN frame too short"),  # not even start + tokens
        (struct.pack("<II", 0, 3), "VERIFY frame too short"),  # no draft count
        (_verify_body(0, 3, 0, []), "with 0 drafts"),  # a round drafts at least one token
        (_verify_body(0, 2, 2, [5, 6]), "with 2 drafts over 2 tokens"),  # no pending token left to verify from
        (_verify_body(0, 80, 65, list(range(65))), "with 65 drafts"),  # past MAX_DRAFT
        (_verify_body(0, 4, 3, [5, 6]), "with 3 drafts"),  # the draft list is cut short
    ],
)
def test_malformed_verify_frames_raise_protocol_error(body, message):
    with pytest.raises(ProtocolError, match=message):
        Frame(Kind.VERIFY, body=body).verify_fields()


@pytest.mark.parametrize("size", [0, 11, 13])
def test_verdict_frames_of_the_wrong_size_raise_protocol_error(size):
    with pytest.raises(ProtocolError, match="VERDICT frame has the wrong size"):
        Frame(Kind.VERDICT, body=b"\x00" * size).verdict_fields()
