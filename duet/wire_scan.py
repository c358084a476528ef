"""Find a message's large bin and ext payloads without decoding it, so they need not be copied.

msgpack copies every bin and ext payload into a new ``bytes``; for a 256 MiB tensor that is two
more passes over fresh memory on the receiver (the release's bin, then the tensor's ext inside it).
`big_payloads` walks the msgpack framing only (type bytes and lengths, never values) and returns
where the payloads of at least `min_size` bytes are, so `duet.wire.decode` can decode everything
else as usual and view those in place.

The walk is deliberately partial: it gives up (returns None, and the caller decodes the ordinary
way, which then applies every check) on anything unusual: more than `max_objects` objects, nesting
deeper than `max_depth`, a length past the end, trailing bytes, the byte 0xC1 msgpack never uses, or
an ext of the code reserved for the placeholders.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional

__all__ = ["Big", "big_payloads", "PLACEHOLDER_CODE"]

PLACEHOLDER_CODE = 100  # an ext code Duet never sends: it stands for a payload viewed in place

# type byte -> (header bytes after it, bytes of the length field) for str/bin/ext; fixed sizes for the rest
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_LEN = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}
_STR_BIN = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_CONTAINER = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # length bytes, items per count


@dataclass(frozen=True)
class Big:
    """One large payload: its whole msgpack object is buf[start:end], its data buf[data:end]."""

    start: int
    data: int
    end: int
    ext_code: Optional[int]  # None for a bin


def big_payloads(buf: memoryview, min_size: int, max_depth: int, max_objects: int = 4096) -> Optional[List[Big]]:
    """The bins and exts of at least `min_size` bytes in the one msgpack object `buf` holds, in order.

    None when there are none, or when the walk gives up (see the module docstring).
    """
    n = len(buf)
    pos = 0
    pending = [1]  # objects still to read at each open level
    found: List[Big] = []
    objects = 0
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        objects += 1
        if objects > max_objects or pos >= n:
            return None
        t = buf[pos]
        if t <= 0x7F or t >= 0xE0:  # fixints
            pos += 1
        elif t <= 0x8F or 0x90 <= t <= 0x9F:  # fixmap, fixarray
            count = (t & 0x0F) * (2 if t <= 0x8F else 1)
            pos += 1
            if len(pending) > max_depth:
                return None
            pending.append(count)
        elif 0xA0 <= t <= 0xBF:  # fixstr
            pos += 1 + (t & 0x1F)
        elif t in _FIXED:
            pos += 1 + _FIXED[t]
        elif t in _STR_BIN or t in _EXT:
            width = _STR_BIN.get(t) or _EXT[t]
            if pos + 1 + width > n:
                return None
            size = _LEN[width].unpack_from(buf, pos + 1)[0]
            head = 1 + width + (1 if t in _EXT else 0)
            if pos + head > n:
                return None
            code = buf[pos + 1 + width] if t in _EXT else None
            if code == PLACEHOLDER_CODE:
                return None
            end = pos + head + size
            if end > n:
                return None
            if size >= min_size and (t in _EXT or t in (0xC4, 0xC5, 0xC6)):
                found.append(Big(pos, pos + head, end, code))
            pos = end
        elif t in _FIXEXT:
            if pos + 1 < n and buf[pos + 1] == PLACEHOLDER_CODE:
                return None
            pos += 2 + _FIXEXT[t]
        elif t in _CONTAINER:
            width, per = _CONTAINER[t]
            if pos + 1 + width > n:
                return None
            count = _LEN[width].unpack_from(buf, pos + 1)[0] * per
            pos += 1 + width
            if len(pending) > max_depth or count > max_objects:
                return None
            pending.append(count)
        else:  # 0xC1: never used
            return None
        if pos > n:
            return None
    if pos != n or not found:
        return None
    return found
