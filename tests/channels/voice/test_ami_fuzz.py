"""Hypothesis: the AMI frame reader takes any bytes, split anywhere, and either yields frames of
strings or raises its own AmiError (the link is then reconnected), never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.channels.voice.ami import AmiError, FrameReader

LINES = st.sampled_from(
    [b"Event: Newchannel", b"Channel: PJSIP/trunk-00000001", b"Uniqueid: 1795594480.1",
     b"CallerIDNum: 13800138000", b"Output: line", b"", b"Response: Success", b": x", b"x:",
     b"\xff\xfe", b"\xed\xa0\x80", b"Key:\x00value", b"a" * 300]
)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(LINES, st.binary(max_size=40)), max_size=40),
    st.lists(st.integers(1, 64), min_size=1, max_size=8),
    st.booleans(),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_frame_reader_takes_any_bytes_split_anywhere(
    lines: list[bytes], cuts: list[int], greeting: bool, eol: bytes
) -> None:
    data = (b"Asterisk Call Manager/7.0.3" + eol if greeting else b"") + eol.join(lines) + eol * 2
    reader = FrameReader(max_frame=4096, greeting=greeting)
    frames = []
    pos = 0
    try:
        for cut in cuts * (len(data) // sum(cuts) + 1):
            frames += reader.feed(data[pos : pos + cut])
            pos += cut
            if pos >= len(data):
                break
    except AmiError:
        return
    for frame in frames:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.items())
        "".join(frame.values()).encode("utf-8")  # replacement characters, never surrogates


@settings(max_examples=200)
@given(
    st.lists(st.lists(LINES.filter(bool), min_size=1, max_size=6), max_size=12),
    st.lists(st.integers(1, 700), min_size=1, max_size=8),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_frames_do_not_depend_on_how_the_bytes_are_split(
    frames: list[list[bytes]], cuts: list[int], eol: bytes
) -> None:
    """However the reads cut the stream (one segment, many events in one read, a line cut in
    two), the reader yields the same frames as from the whole stream at once."""
    data = b"Asterisk Call Manager/7.0.3" + eol + b"".join(
        eol.join(lines) + eol * 2 for lines in frames)
    whole = FrameReader(max_frame=1 << 20).feed(data)
    reader = FrameReader(max_frame=1 << 20)
    got = []
    pos = 0
    for cut in cuts * (len(data) // sum(cuts) + 1):
        got += reader.feed(data[pos : pos + cut])
        pos += cut
        if pos >= len(data):
            break
    assert got == whole
    assert whole[0] == {"Greeting": "Asterisk Call Manager/7.0.3"}
    assert len(whole) == 1 + len(frames)
