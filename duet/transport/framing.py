"""Frames: many small messages coalesced into one data channel message, big ones chunked.

Why: aiortc pays a fixed cost per data channel message (a task, a queue entry,
SCTP bookkeeping), so one `send()` per small message tops out near 2,300 msg/s;
and it refuses messages above 256 KiB, so tensors must be split. This module is
pure and synchronous, so it is tested without any networking.

A frame is a concatenation of records. Every record starts with a 5-byte header
(type: u8, length: u32 big endian) followed by `length` payload bytes:

    WHOLE   a complete message
    FIRST   u64 total message size, then the first chunk (length counts the chunk only)
    MIDDLE  a further chunk of the message in progress
    LAST    the final chunk; the message is complete when it arrives
    CONTROL a one-byte control code (keepalive, goodbye); never a user message

Chunks of one message are consecutive in the record stream (the link is ordered
and there is one sender), so no message id is needed.
"""
from __future__ import annotations

import collections
import struct
from typing import Callable, Deque, List, Optional, Union

from ..errors import ProtocolError

# aiortc's advertised (and enforced) maximum data channel message size.
MAX_FRAME = 262144
# Refuse to allocate for an announced message larger than this, by default.
DEFAULT_MAX_MESSAGE = 1 << 30

WHOLE = 1
FIRST = 2
MIDDLE = 3
LAST = 4
CONTROL = 5

CTRL_PING = 1  # keepalive: "I am alive", sent when the writer is idle
CTRL_BYE = 2   # orderly close: the peer called close()

_HDR = struct.Struct(">BI")        # type, length
_FIRST = struct.Struct(">BIQ")     # type, chunk length, total
HDR_SIZE = _HDR.size               # 5
FIRST_HDR_SIZE = _FIRST.size       # 13
# Do not start a chunked message in a frame with less room than this: a tiny
# first chunk would cost a record header and a receiver allocation for nothing.
_MIN_FIRST_CHUNK = 4096

Buffer = Union[bytes, bytearray, memoryview]


class Framer:
    """Turns a queue of messages into frames of at most `max_frame` bytes.

    Messages that fit whole in the current frame are packed together; a
    message that does not fit in one frame is chunked with memoryview slices,
    so its bytes are copied exactly once, into the frame. Not thread safe: the
    transport's writer owns it.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if max_frame < 64:
            raise ValueError(f"max_frame {max_frame} is too small")
        self.max_frame = max_frame
        self._queue: Deque[tuple[int, Buffer]] = collections.deque()
        # The message being chunked: its view and the offset already framed.
        self._cur: Optional[memoryview] = None
        self._cur_off = 0
        self._pending = 0
        self.messages_added = 0
        self.messages_framed = 0  # messages whose last byte is in a returned frame

    @property
    def pending_bytes(self) -> int:
        """Message bytes queued and not yet put into a returned frame."""
        return self._pending

    @property
    def pending_messages(self) -> int:
        """Messages (and control records) not completely framed yet."""
        return len(self._queue) + (1 if self._cur is not None else 0)

    def __bool__(self) -> bool:
        return bool(self._queue) or self._cur is not None

    def add(self, msg: Buffer) -> None:
        """Queue one message (any size, including empty)."""
        self._queue.append((WHOLE, msg))
        self._pending += len(msg)
        self.messages_added += 1

    def add_control(self, code: int) -> None:
        """Queue a control record (CTRL_PING, CTRL_BYE) after the messages queued so far."""
        self._queue.append((CONTROL, bytes((code,))))

    def next_frame(self) -> Optional[bytes]:
        """The next frame, or None when nothing is pending."""
        if not self:
            return None
        parts: List[Buffer] = []
        space = self.max_frame
        queue = self._queue
        hdr = _HDR.pack
        while True:
            if self._cur is not None:
                # Continue the message being chunked.
                view = self._cur
                remaining = len(view) - self._cur_off
                room = space - HDR_SIZE
                if room <= 0:
                    break
                if remaining <= room:
                    parts.append(hdr(LAST, remaining))
                    parts.append(view[self._cur_off:])
                    space -= HDR_SIZE + remaining
                    self._pending -= remaining
                    self._cur = None
                    self._cur_off = 0
                    self.messages_framed += 1
                    continue
                parts.append(hdr(MIDDLE, room))
                parts.append(view[self._cur_off:self._cur_off + room])
                self._cur_off += room
                self._pending -= room
                space = 0
                break
            if not queue:
                break
            kind, msg = queue[0]
            n = len(msg)
            if HDR_SIZE + n <= space:
                queue.popleft()
                parts.append(hdr(kind, n))
                if n:
                    parts.append(msg)
                space -= HDR_SIZE + n
                if kind == WHOLE:
                    self._pending -= n
                    self.messages_framed += 1
                continue
            min_first = FIRST_HDR_SIZE + min(_MIN_FIRST_CHUNK, self.max_frame // 8)
            if HDR_SIZE + n <= self.max_frame or space < min_first:
                # It fits whole in a fresh frame, or there is too little room
                # left to start chunking here: close this frame.
                if parts:
                    break
            # Start chunking (kind is WHOLE: control records are tiny).
            queue.popleft()
            view = msg if isinstance(msg, memoryview) else memoryview(msg)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            room = space - FIRST_HDR_SIZE
            parts.append(_FIRST.pack(FIRST, room, n))
            parts.append(view[:room])
            self._cur = view
            self._cur_off = room
            self._pending -= room
            space = 0
            break
        return b"".join(parts)


class Deframer:
    """Parses frames back into messages; validates every length before using it.

    Complete chunked messages are delivered as the preallocated `bytearray`
    they were reassembled into (no final copy); small messages as `bytes`.
    `on_progress(received, total)` is called after every chunk of a chunked
    message; `on_control(code)` for each control record.
    """

    def __init__(
        self,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
        on_progress: Optional[Callable[[int, int], None]] = None,
        on_control: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.max_message_size = max_message_size
        self.on_progress = on_progress
        self.on_control = on_control
        self._buf: Optional[bytearray] = None
        self._got = 0
        self._total = 0
        self.failed = False

    @property
    def in_progress(self) -> Optional[tuple[int, int]]:
        """(received, total) of the chunked message being reassembled, if any."""
        return (self._got, self._total) if self._buf is not None else None

    def _fail(self, why: str) -> ProtocolError:
        self.failed = True
        self._buf = None
        return ProtocolError(f"malformed frame: {why}")

    def feed(self, frame: Buffer) -> List[Union[bytes, bytearray]]:
        """Parse one frame; return the messages it completes, in order."""
        if self.failed:
            raise ProtocolError("malformed frame: the stream already failed")
        view = memoryview(frame)
        size = len(view)
        if size == 0:
            raise self._fail("empty frame")
        out: List[Union[bytes, bytearray]] = []
        pos = 0
        unpack_hdr = _HDR.unpack_from
        while pos < size:
            if size - pos < HDR_SIZE:
                raise self._fail("truncated record header")
            kind, n = unpack_hdr(view, pos)
            if kind == FIRST:
                if size - pos < FIRST_HDR_SIZE:
                    raise self._fail("truncated first-chunk header")
                _, n, total = _FIRST.unpack_from(view, pos)
                pos += FIRST_HDR_SIZE
            else:
                pos += HDR_SIZE
            if n > size - pos:
                raise self._fail(f"record of {n} bytes overruns the frame")
            end = pos + n
            if kind == WHOLE:
                if self._buf is not None:
                    raise self._fail("whole message inside a chunked message")
                if n > self.max_message_size:
                    raise self._fail(f"message of {n} bytes exceeds the limit")
                out.append(bytes(view[pos:end]))
            elif kind == FIRST:
                if self._buf is not None:
                    raise self._fail("new chunked message before the previous ended")
                if total > self.max_message_size:
                    raise self._fail(
                        f"announced message of {total} bytes exceeds the limit of "
                        f"{self.max_message_size} bytes")
                if n > total:
                    raise self._fail("first chunk larger than the announced total")
                self._buf = bytearray(total)
                self._buf[0:n] = view[pos:end]
                self._got = n
                self._total = total
                if self.on_progress is not None:
                    self.on_progress(n, total)
            elif kind == MIDDLE or kind == LAST:
                buf = self._buf
                if buf is None:
                    raise self._fail("chunk without a first chunk")
                got = self._got + n
                if got > self._total:
                    raise self._fail("chunks exceed the announced total")
                if kind == LAST and got != self._total:
                    raise self._fail("last chunk ends before the announced total")
                buf[self._got:got] = view[pos:end]
                self._got = got
                if self.on_progress is not None:
                    self.on_progress(got, self._total)
                if kind == LAST:
                    out.append(buf)
                    self._buf = None
            elif kind == CONTROL:
                if n != 1:
                    raise self._fail("control record of the wrong length")
                if self.on_control is not None:
                    self.on_control(view[pos])
            else:
                raise self._fail(f"unknown record type {kind}")
            pos = end
        return out


def frame_all(messages: List[Buffer], max_frame: int = MAX_FRAME) -> List[bytes]:
    """Frame a list of messages at once (tests, tools)."""
    framer = Framer(max_frame)
    for m in messages:
        framer.add(m)
    frames: List[bytes] = []
    while True:
        f = framer.next_frame()
        if f is None:
            return frames
        frames.append(f)
