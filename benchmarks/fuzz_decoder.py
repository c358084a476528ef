#!/usr/bin/env python
"""Feed hostile bytes to duet.wire.decode and check it only ever raises ProtocolError.

The decoder is the first code that touches bytes from a peer (security rule 1),
so this hammers it with random bytes, mutations of valid encodings of realistic
messages, and hand-built hostile messages (bad shapes, dtypes, counts, nesting).
Outcomes are counted as decoded OK / ProtocolError / crash (anything else). A
hard crash (segfault) kills the process; faulthandler then prints where.

    python benchmarks/fuzz_decoder.py [--count 100000] [--seconds 300] [--seed 0]

Exits 1 if any input raised something other than ProtocolError.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import random
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from duet import wire  # noqa: E402
from duet.errors import ProtocolError  # noqa: E402
from duet.wire import Ref, decode, encode  # noqa: E402


def corpus(seed: int) -> list[bytes]:
    """Encodings of messages shaped like the ones Duet sends."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    msgs: list[object] = [
        {"t": "call", "rid": 5, "kind": "func", "name": "torch.add", "args": [Ref(1), 2.0], "kwargs": {}},
        {"t": "call", "rid": 6, "kind": "method", "name": "reshape", "self": Ref(3),
         "args": [torch.Size([2, -1])], "kwargs": {}, "out": Ref(7)},
        {"t": "call", "rid": 8, "kind": "method", "name": "__getitem__", "self": Ref(1),
         "args": [(slice(None, 2), Ellipsis, None, 0, slice(1, -1, 2))], "kwargs": {}, "out": Ref(9)},
        {"t": "call", "rid": 9, "kind": "func", "name": "torch.zeros", "args": [3, 4],
         "kwargs": {"dtype": torch.float16, "requires_grad": True}, "out": Ref(10)},
        {"t": "get", "rid": 10, "ref": Ref(2), "reason": "plot the training loss ✓"},
        {"t": "reply", "rid": 10, "ok": True, "value": torch.randn(4, 4, generator=g)},
        {"t": "reply", "rid": 11, "ok": False, "error": {"op": "torch.matmul", "type": "RuntimeError"}},
        {"t": "upload", "ref": Ref(12), "value": torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8, generator=g)},
        {"t": "upload", "ref": Ref(13), "value": torch.randn(3, 5, generator=g).requires_grad_(True)},
        {"t": "upload", "ref": Ref(14), "value": torch.randn(6, generator=g).to(torch.bfloat16)},
        {"t": "upload", "ref": Ref(15), "value": torch.randn(2, 2, dtype=torch.complex64, generator=g)},
        {"t": "upload", "ref": Ref(16), "value": [torch.tensor(True), torch.zeros(0, 3), torch.tensor(3.5)]},
        {"t": "np", "value": rng.standard_normal((3, 3)), "labels": rng.integers(0, 10, 8).astype(np.int64),
         "scale": np.float32(0.5), "flag": np.bool_(True), "dt": np.dtype("int16")},
        {"t": "plan", "rid": 20, "actions": [
            {"op": "torch.nn.functional.linear", "args": [Ref(100), Ref(101), Ref(102)], "out": Ref(103)},
            {"op": "torch.relu", "args": [Ref(103)], "out": Ref(104)},
            {"op": "torch.nn.functional.cross_entropy", "args": [Ref(104), Ref(105)], "kwargs": {"reduction": "mean"},
             "out": Ref(106)},
        ], "placeholders": {0: Ref(100), 1: Ref(105)}},
        {"t": "hello", "name": "alice", "key": bytes(range(32)), "version": (0, 1, 0), "caps": ["plan", "fx"]},
        {"t": "losses", "values": [float(x) for x in rng.standard_normal(40)] + [float("nan"), float("inf")]},
        {"t": "complex", "z": 1 + 2j, "big": 2**64 - 1, "neg": -(2**63), "nested": [[[(1, (2, (3,)))]]]},
        [Ref(i) for i in range(50)],
        (1, "two", b"three", None, True, 4.5),
        torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        rng.standard_normal((4, 4)).astype(np.float16),
    ]
    return [encode(m) for m in msgs]


INTERESTING_BYTES = [0x00, 0x01, 0x0F, 0x10, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2,
                     0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCF, 0xD3, 0xD4, 0xD8, 0xD9, 0xDB,
                     0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]
INTERESTING_INTS = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                    0x80000000, 0xFFFFFFFF, 1_000_000, 10_000_000]


def mutate(rnd: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """Apply 1-6 random byte-level edits."""
    b = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.randrange(9)
        n = len(b)
        pos = rnd.randrange(n) if n else 0
        if op == 0 and n:
            b[pos] ^= 1 << rnd.randrange(8)
        elif op == 1 and n:
            b[pos] = rnd.choice(INTERESTING_BYTES)
        elif op == 2 and n:
            b[pos] = rnd.randrange(256)
        elif op == 3:
            b[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 4 and n:
            del b[pos : pos + rnd.randint(1, 16)]
        elif op == 5:
            del b[pos:]
        elif op == 6 and n > 4:  # overwrite a length-like field
            width = rnd.choice((1, 2, 4))
            value = rnd.choice(INTERESTING_INTS) & ((1 << (8 * width)) - 1)
            b[pos : pos + width] = value.to_bytes(width, "big")
        elif op == 7 and n:  # duplicate a slice
            end = min(n, pos + rnd.randint(1, 64))
            b[pos:pos] = b[pos:end]
        elif op == 8:  # splice in part of another message
            other = rnd.choice(others)
            if other:
                s = rnd.randrange(len(other))
                b[pos:pos] = other[s : s + rnd.randint(1, 64)]
    return bytes(b)


def structured(rnd: random.Random) -> bytes:
    """Hand-built hostile messages aimed at the ext schema and the limits."""
    kind = rnd.randrange(8)
    names = ["float32", "int64", "bool", "bfloat16", "complex128", "uint8", "object", "float128", "O", "", "<f4", 7]
    if kind in (0, 1):  # tensor/ndarray ext with random header
        ndim = rnd.choice([0, 1, 2, 3, 16, 17, 40])
        shape = [rnd.choice([0, 1, 2, 3, -1, 2**31, 2**40, 2**62, 2**63 - 1, 2**64 - 1]) for _ in range(ndim)]
        data = rnd.randbytes(rnd.choice([0, 1, 2, 4, 8, 24, 100]))
        fields = [rnd.choice(names), shape] + ([rnd.choice([True, False, 1, None])] if kind == 0 else []) + [data]
        if rnd.random() < 0.2:
            fields = fields[: rnd.randrange(len(fields))]
        payload = msgpack.packb(fields, use_bin_type=True)
        return msgpack.packb(msgpack.ExtType(wire.EXT_TENSOR if kind == 0 else wire.EXT_NDARRAY, payload))
    if kind == 2:  # any ext code, random payload
        payload = rnd.randbytes(rnd.randint(0, 40))
        code = rnd.randrange(-128, 128)
        return b"\xc7" + bytes([len(payload)]) + code.to_bytes(1, "big", signed=True) + payload
    if kind == 3:  # deep nesting of lists, maps and tuples
        depth = rnd.choice([31, 32, 33, 1000, 1024, 1025, 100_000])
        unit = rnd.choice([b"\x91", b"\x81\xa1k", b"\x92\xc7\x00\x01"])
        return unit * depth + b"\xc0"
    if kind == 4:  # huge claimed lengths in a tiny message
        tag = rnd.choice([b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xdb", b"\xc6", b"\xc9"])
        width = 2 if tag in (b"\xdc", b"\xde") else 4
        claim = rnd.choice([0xFFFF, 10_000_000, 0xFFFFFFFF]) & ((1 << (8 * width)) - 1)
        return tag + claim.to_bytes(width, "big") + rnd.randbytes(rnd.randint(0, 16))
    if kind == 5:  # small ext payloads with wrong types
        code = rnd.choice([wire.EXT_COMPLEX, wire.EXT_SLICE, wire.EXT_ELLIPSIS, wire.EXT_TORCH_DTYPE,
                           wire.EXT_TORCH_SIZE, wire.EXT_NP_DTYPE, wire.EXT_REF, wire.EXT_NPSCALAR, wire.EXT_TUPLE])
        value = rnd.choice([None, True, 1, -1, 2**63, 1.5, "float32", "object", b"\x00" * 8, [1.0, 2.0],
                            [1, 2, 3], [None, None, None], ["bool", b"\x02"], {"a": 1}, [[1]] * 17])
        return msgpack.packb(msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True)))
    if kind == 6:  # maps with bad keys
        key = rnd.choice([b"\xca\x3f\xc0\x00\x00", b"\xc0", b"\xc3", b"\xc4\x01k", b"\x91\x01", b"\x80",
                          b"\x92\xc7\x00\x01\x01", b"\xd4\x0b\x01", b"\xd6\xff\x00\x00\x00\x01"])
        return b"\x81" + key + b"\x01"
    return b"\x92\xc7\x00\x01" * rnd.randint(1, 5) + rnd.randbytes(rnd.randint(0, 30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="number of inputs (default 100000)")
    ap.add_argument("--seconds", type=float, default=300.0, help="stop after this long (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; same seed, same inputs")
    ap.add_argument("--show", type=int, default=5, help="crashes to print in full")
    args = ap.parse_args(argv)

    faulthandler.enable()
    rnd = random.Random(args.seed)
    seeds = corpus(args.seed)
    for s in seeds:  # the corpus itself must decode
        decode(s)
    sources: list[tuple[str, Callable[[], bytes]]] = [
        ("random", lambda: rnd.randbytes(rnd.choice([1, 2, 4, 8, 16, 64, 256, 1024]))),
        ("mutation", lambda: mutate(rnd, rnd.choice(seeds), seeds)),
        ("structured", lambda: structured(rnd)),
    ]
    weights = [2, 6, 2]
    stats = {name: [0, 0, 0] for name, _ in sources}  # ok, ProtocolError, crash
    crashes: list[tuple[str, bytes, str]] = []
    slowest = (0.0, b"")
    # Python's cyclic GC sometimes runs a full pass (~80 ms with torch loaded) during
    # some input; time spent in it is tracked so "slowest" reflects the decoder.
    gc_time = [0.0, 0.0]  # total, start of current pass

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(on_gc)
    print(f"fuzz_decoder: seed={args.seed} count={args.count} seconds={args.seconds} corpus={len(seeds)} messages",
          flush=True)

    start = time.monotonic()
    deadline = start + args.seconds
    done = 0
    while done < args.count and time.monotonic() < deadline:
        name, make = rnd.choices(sources, weights)[0]
        data = make()
        t0 = time.perf_counter()
        gc0 = gc_time[0]
        try:
            decode(data)
            outcome = 0
        except ProtocolError:
            outcome = 1
        except BaseException as exc:  # noqa: BLE001 - anything else is the bug we hunt
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = 2
            crashes.append((name, data, "".join(traceback.format_exception(exc))))
        took = time.perf_counter() - t0 - (gc_time[0] - gc0)
        if took > slowest[0]:
            slowest = (took, data)
        stats[name][outcome] += 1
        done += 1
    elapsed = time.monotonic() - start
    gc.callbacks.remove(on_gc)

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    ok = sum(s[0] for s in stats.values())
    refused = sum(s[1] for s in stats.values())
    crashed = sum(s[2] for s in stats.values())
    print(f"inputs         {done} in {elapsed:.1f} s ({done / max(elapsed, 1e-9):,.0f} inputs/s)"
          + ("" if done >= args.count else "  [stopped by --seconds]"))
    print(f"decoded OK     {ok}")
    print(f"ProtocolError  {refused}")
    print(f"crash          {crashed}")
    for name, (a, b, c) in stats.items():
        print(f"  {name:<11}  ok={a} ProtocolError={b} crash={c}")
    print(f"slowest input  {slowest[0] * 1e3:.1f} ms ({len(slowest[1])} bytes), not counting GC "
          f"({gc_time[0]:.1f} s in GC overall)")
    print(f"peak RSS       {peak_kib / 1024:.0f} MiB")
    for name, data, tb in crashes[: args.show]:
        print(f"\n--- crash from {name} input ({len(data)} bytes): {data[:64].hex()}\n{tb}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
