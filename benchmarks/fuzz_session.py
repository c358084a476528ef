#!/usr/bin/env python
"""Fuzz the owner's session dispatcher with hostile messages from a scientist.

`benchmarks/fuzz_decoder.py` hammers `duet.wire.decode` alone. This script goes
one layer up: a real owner (`duet.local_pair()`: real Owner, real
ScientistConnection, real worker thread, in-memory transport) receives
structured-random messages of every type the dispatcher knows (call, put, free,
req, model, plan_def, plan_run, epoch, batch) and of types it must ignore
(hello, welcome, rep, bye, unknown), with allowlisted, dunder and dotted names,
valid and invalid `Ref` ids, nested lists, odd tensors and arrays, plus raw
random and mutated bytes straight into the transport.

Afterwards the owner must still be serving (a normal op round trip works, the
connection and its worker are alive), and no record at level ERROR may have
been logged under ``duet`` (the owner's worker logs "unexpected error while
handling ..." for an exception it did not expect; the transport logs
"on_message handler ... raised"). Messages are pipelined, so a `ping()` round
trip is used as a barrier every ``--barrier`` inputs.

Safety on a shared machine: some allowlisted ops allocate from integer
arguments without a size guard (see SECURITY.md, "Limitations"), so this
process lowers its own soft RLIMIT_AS to (current size + ``--headroom-gb``):
an allocation that would take the machine's memory fails at once inside the
op (the owner reports it as a RemoteError) instead.

    python benchmarks/fuzz_session.py [--count 100000] [--seconds 600] [--seed 0]
    python benchmarks/fuzz_session.py --count 0 --tiny-actions 1000000

``--tiny-actions N`` also sends N fire-and-forget ``x.add_(1)`` actions and
checks the owner finishes them with the right value and bounded memory.

Exits 1 on any crash, unexpected error, or an owner that stopped serving.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import random
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import duet  # noqa: E402
from duet import allowlist, wire  # noqa: E402
from duet.errors import ProtocolError  # noqa: E402
from duet.wire import Ref  # noqa: E402

# ---------------------------------------------------------------------------
# measuring



def _barrier(scientist: "duet.Scientist", timeout: float) -> None:
    """Wait until the owner handled everything sent so far; errors of result-less actions are expected here."""
    try:
        scientist.ping(timeout=timeout)
    except duet.DuetError:
        scientist.ping(timeout=timeout)

def status_kb(field: str, pid: str = "self") -> int:
    """A field of /proc/<pid>/status in kB (VmRSS, VmHWM, VmSize); 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cap_address_space(headroom_gb: float) -> Optional[tuple]:
    """Lower the soft RLIMIT_AS to current size + headroom; returns the old limits to restore."""
    size = status_kb("VmSize") * 1024
    if not size:
        return None
    old = resource.getrlimit(resource.RLIMIT_AS)
    new = size + int(headroom_gb * 2**30)
    if old[1] != resource.RLIM_INFINITY:
        new = min(new, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (new, old[1]))
    return old


class LogCounter(logging.Handler):
    """Counts records under the ``duet`` logger by level; keeps the first ERROR records in full."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.counts: Dict[str, int] = {}
        self.errors: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1
        if record.levelno >= logging.ERROR and len(self.errors) < 5:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.errors.append(text)

    @property
    def error_count(self) -> int:
        return self.counts.get("ERROR", 0) + self.counts.get("CRITICAL", 0)


def install_counter() -> tuple:
    """Route every ``duet`` record to a counter only (no printing, no formatting cost)."""
    root = logging.getLogger("duet")
    counter = LogCounter()
    saved = (root.level, root.propagate, list(root.handlers))
    root.handlers = [counter]
    root.setLevel(logging.WARNING)
    root.propagate = False
    return counter, saved


def remove_counter(saved: tuple) -> None:
    root = logging.getLogger("duet")
    root.setLevel(saved[0])
    root.propagate = saved[1]
    root.handlers = saved[2]


# ---------------------------------------------------------------------------
# hostile inputs

SMALL_INTS = [-(2**63), -2, -1, 0, 0, 1, 1, 2, 3, 4, 7, 16, 64]
HUGE_INTS = [2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.5, -3.25, 1e308, -1e-308, float("nan"), float("inf"), float("-inf")]
STRINGS = ["", "x", "dim", "mean", "float32", "O", "object", "../../etc/passwd", "\x00", "é✓\u202e",
           "__class__", "a" * 300, "sum", "none", "cuda", "meta", "reflect"]
DUNDERS = ["__class__", "__dict__", "__reduce_ex__", "__reduce__", "__getattribute__", "__setattr__",
           "__init__", "__globals__", "__subclasses__", "__builtins__", "__import__", "__call__",
           "__del__", "__getitem__", "__code__", "_modules", "_apply", "__array_interface__"]
EVIL_PATHS = ["os.system", "builtins.eval", "builtins.exec", "builtins.open", "builtins.getattr",
              "builtins.__import__", "subprocess.run", "pickle.loads", "torch.load", "torch.save",
              "torch.from_file", "torch.hub.load", "torch.ops.aten.add", "torch.compile", "torch.jit.script",
              "numpy.load", "numpy.fromfile", "numpy.memmap", "numpy.ctypeslib.load_library",
              "operator.attrgetter", "operator.methodcaller", "torch.Tensor.__reduce_ex__", "torch..add",
              "torch.nn.Module", "torch.optim.lr_scheduler.LambdaLR", "importlib.import_module", ".", "torch.",
              "torch.add.__globals__", "numpy.lib.format.open_memmap", "torch.utils.cpp_extension.load"]
KWARG_KEYS = ["dim", "keepdim", "dtype", "out", "device", "size", "shape", "requires_grad", "axis", "p",
              "generator", "memory_format", "pin_memory", "minlength", "bins", "num_classes", "alpha",
              "__class__", "self", "input", "other", "reduction", "inplace", "lr", "x", ""]
TORCH_DTYPES = list(wire._TORCH_DTYPE.values())
NP_NAMES = list(wire._NP_DTYPE)
ERROR_TYPES = ["NotAllowed", "LimitExceeded", "RemoteError", "RequestDenied", "Nope", 3, None]
MESSAGE_TYPES = ["call"] * 10 + ["put"] * 2 + ["free", "req", "req", "req", "hello", "welcome", "unknown",
                                                "model", "plan_def", "plan_run", "epoch", "batch", "rep",
                                                "bye", "failed", "queued", "$invalid", "rejected", "call "]

FUNC_NAMES = sorted(allowlist.FUNCTIONS)
METHOD_NAMES = sorted(allowlist.all_method_names())
ATTR_NAMES = sorted(allowlist.all_attribute_names())
NN_NAMES = sorted(allowlist.NN_MODULES)


class Hostile:
    """Seeded generator of hostile messages aimed at one owner's dispatcher.

    ``pool`` holds ids of small objects the scientist really created (the last a
    pointer to a private asset) (so many
    actions get past the id check and run); results go to fresh ids that are
    never used as inputs again, so no input of any action is ever large.
    """

    def __init__(self, seed: int, pool: List[int], first_rid: int) -> None:
        self.rnd = random.Random(seed)
        self.pool = list(pool)
        self.next_rid = first_rid
        self.made: List[int] = []
        self.corpus: List[bytes] = []

    # -- values ---------------------------------------------------------------
    def int_(self) -> int:
        r = self.rnd.random()
        return self.rnd.choice(HUGE_INTS) if r < 0.15 else self.rnd.choice(SMALL_INTS)

    def ref(self) -> Ref:
        r = self.rnd.random()
        if r < 0.75 and self.pool:
            return Ref(self.rnd.choice(self.pool))
        if r < 0.85 and self.made:
            return Ref(self.rnd.choice(self.made[-64:]))  # may have failed; scalars/small only in practice
        return Ref(self.rnd.choice([0, 999_999_999, 2**63 - 1, self.next_rid + 5, 12345]))

    def tensor(self) -> Any:
        rnd = self.rnd
        dtype = rnd.choice(TORCH_DTYPES)
        shape = rnd.choice([(), (0,), (1,), (3,), (2, 2), (0, 3), (1, 1, 4), (2, 1, 2, 1)])
        n = int(np.prod(shape)) if shape else 1
        if dtype == torch.bool:
            t = torch.tensor([rnd.random() < 0.5 for _ in range(n)], dtype=torch.bool).reshape(shape)
        elif dtype.is_complex:
            t = torch.randn(shape, dtype=dtype)
        elif dtype.is_floating_point:
            t = torch.tensor([rnd.choice(FLOATS) for _ in range(n)], dtype=torch.float64).reshape(shape).to(dtype)
            if rnd.random() < 0.2:
                t.requires_grad_(True)
        else:
            info = torch.iinfo(dtype)
            t = torch.tensor([rnd.choice([info.min, info.max, 0, 1, -1 if info.min < 0 else 2]) for _ in range(n)],
                             dtype=dtype).reshape(shape)
        if rnd.random() < 0.5:
            return t
        if dtype == torch.bfloat16:
            return t.detach().float().numpy()
        return t.detach().numpy().copy()

    def value(self, depth: int = 0) -> Any:
        rnd = self.rnd
        r = rnd.randrange(22 if depth < 3 else 17)
        if r == 0:
            return None
        if r == 1:
            return rnd.random() < 0.5
        if r in (2, 3):
            return self.int_()
        if r == 4:
            return rnd.choice(FLOATS)
        if r == 5:
            return rnd.choice(STRINGS)
        if r == 6:
            return rnd.randbytes(rnd.choice([0, 1, 8, 32]))
        if r in (7, 8, 9):
            return self.ref()
        if r == 10:
            return slice(rnd.choice([None, 0, -1, 2**62]), rnd.choice([None, 1, 3, -(2**63)]),
                         rnd.choice([None, 1, 2, -1, 0]))
        if r == 11:
            return Ellipsis
        if r == 12:
            return rnd.choice(TORCH_DTYPES)
        if r == 13:
            return torch.Size([self.int_() % 8 for _ in range(rnd.randrange(3))])
        if r == 14:
            return rnd.choice([np.dtype(rnd.choice(NP_NAMES)), np.float32(1.5), np.int64(-1), np.bool_(True),
                               complex(1, -1), np.uint8(255)])
        if r in (15, 16):
            return self.tensor()
        if r in (17, 18):
            return [self.value(depth + 1) for _ in range(rnd.randrange(4))]
        if r == 19:
            return tuple(self.value(depth + 1) for _ in range(rnd.randrange(4)))
        if r == 20:
            return {rnd.choice(KWARG_KEYS + [0, 7]): self.value(depth + 1) for _ in range(rnd.randrange(3))}
        return [self.int_() for _ in range(rnd.randrange(1, 4))]  # a shape-like list

    def args(self, kind: str) -> Any:
        rnd = self.rnd
        args = [self.value(1) for _ in range(rnd.randrange(4))]
        if kind in ("method", "attr", "call") and rnd.random() < 0.9:
            args.insert(0, self.ref())
        if rnd.random() < 0.03:
            return rnd.choice(["not a list", 5, None, {"a": 1}, (Ref(1),)])
        return args

    def kwargs(self) -> Any:
        rnd = self.rnd
        if rnd.random() < 0.6:
            return {}
        if rnd.random() < 0.03:
            return rnd.choice([[1, 2], "x", None])
        return {rnd.choice(KWARG_KEYS): self.value(1) for _ in range(rnd.randrange(1, 3))}

    def name(self, kind: str) -> str:
        rnd = self.rnd
        r = rnd.random()
        if r < 0.12:
            return rnd.choice(DUNDERS)
        if r < 0.2:
            return rnd.choice(EVIL_PATHS)
        if r < 0.23:
            return rnd.choice(STRINGS)
        if kind == "func":
            return rnd.choice(NN_NAMES) if r < 0.3 else rnd.choice(FUNC_NAMES)
        if kind == "attr":
            return rnd.choice(ATTR_NAMES)
        return rnd.choice(METHOD_NAMES + FUNC_NAMES[:20])

    def rid(self) -> Any:
        rnd = self.rnd
        r = rnd.random()
        if r < 0.8:
            self.next_rid += 1
            self.made.append(self.next_rid)
            if len(self.made) > 4096:
                del self.made[:2048]
            return self.next_rid
        return rnd.choice([None, None, -1, "7", 1.0, 2**63 - 1, True, [1]])

    def message(self) -> Dict[str, Any]:
        rnd = self.rnd
        t = rnd.choice(MESSAGE_TYPES)
        msg: Dict[str, Any] = {"t": t}
        if t == "call":
            kind = rnd.choice(["func", "func", "func", "method", "method", "attr", "call", "exec", "", "Func"])
            msg.update(rid=self.rid(), kind=kind, name=self.name(kind), args=self.args(kind), kwargs=self.kwargs())
            if rnd.random() < 0.05:
                del msg[rnd.choice(["kind", "name", "args", "kwargs", "rid"])]
        elif t == "put":
            msg.update(rid=self.rid(), value=self.value())
        elif t == "free":
            ids = [rnd.choice(self.made) if self.made and rnd.random() < 0.7 else self.value(2) for _ in range(3)]
            msg["ids"] = ids if rnd.random() < 0.9 else self.value()
        elif t == "req":
            what = rnd.choice(["store", "asset", "meta", "meta", "release", "release", "loader", "ping", "nope", 5])
            # Reply ids far above the session's own counter, so no reply can resolve a real request.
            msg.update(id=2**40 + rnd.randrange(2**20) if rnd.random() < 0.8 else rnd.choice([-3, "1", None]), kind=what)
            if what == "asset":
                msg.update(name=rnd.choice(["ages", "nope", "__class__", 5, "images"]), rid=self.rid())
            elif what in ("meta", "release"):
                msg["obj"] = rnd.choice([self.ref().id, self.pool[-1], rnd.choice(self.made) if self.made else 0, "x", None])
                msg["reason"] = rnd.choice(["", "fuzz", 5, "x" * 3000])
            elif what == "loader":
                msg.update(lid=rnd.choice([0, 1, 2, "x"]), name=rnd.choice(["ages", "nope", 3]),
                           batch_size=rnd.choice([1, 0, -1, 2**40, "x", None]), shuffle=self.value(2),
                           drop_last=self.value(2), seed=rnd.choice([None, 1, -1, 2**63 - 1, "s"]))
        elif t == "hello" or t == "welcome":
            msg.update(pub=rnd.randbytes(rnd.choice([0, 31, 32])), sig=rnd.randbytes(64), reason=self.value(2))
        elif t == "model":
            msg.update(rid=self.rid(), graph=rnd.choice([self.value(), self.model_desc()]))
        elif t == "plan_def":
            msg.update(pid=rnd.choice([1, 2, 3, -1, "p", None]), inputs=rnd.choice([0, 1, 2, -1, 2**40]),
                       actions=[self.plan_action() for _ in range(rnd.randrange(4))],
                       outputs=[rnd.choice([0, 1, 10, 11, -1, "x"]) for _ in range(rnd.randrange(3))],
                       name=self.value(2))
        elif t == "plan_run":
            msg.update(pid=rnd.choice([1, 2, 3, -1, None]), args=[self.ref() for _ in range(rnd.randrange(3))],
                       out=[self.rid() for _ in range(rnd.randrange(3))])
        elif t == "epoch":
            msg["loader"] = rnd.choice([0, 1, 2, "x", None])
        elif t == "batch":
            msg.update(loader=rnd.choice([0, 1, 2, "x"]), rids=[self.rid() for _ in range(rnd.randrange(3))])
        elif t == "rep":
            msg.update(id=rnd.choice([1, 2, 2**40]), ok=self.value(2), value=self.value(2), error=self.value(2))
        elif t in ("failed", "queued", "bye", "rejected"):
            msg.update(rid=self.rid(), error={"type": rnd.choice(ERROR_TYPES), "message": "x"}, reason=self.value(2))
        else:
            msg.update(payload=self.value())
        if rnd.random() < 0.05:  # extra unknown fields
            msg[rnd.choice(["__class__", "self", "x", "t2"])] = self.value(2)
        return msg

    def plan_action(self) -> Any:
        rnd = self.rnd
        kind = rnd.choice(["func", "method", "attr", "call", "exec"])
        return {"rid": rnd.choice([None, 10, 11, 12, -1, 0]), "kind": kind, "name": self.name(kind),
                "args": [rnd.choice([Ref(0), Ref(1), Ref(10), Ref(99)])] + [self.value(2) for _ in range(rnd.randrange(2))],
                "kwargs": self.kwargs() if rnd.random() < 0.9 else 5}

    def model_desc(self) -> Dict[str, Any]:
        rnd = self.rnd
        cls = rnd.choice(NN_NAMES + ["torch.nn.Module", "os.system", "torch.nn.Sequential"])
        fn = rnd.choice(FUNC_NAMES + EVIL_PATHS + ["torch.zeros"])
        return {
            "format": rnd.choice(["duet.fx/1", "duet.fx/1", "pickle"]),
            "modules": [{"cls": cls, "kwargs": {rnd.choice(["in_features", "out_features", "device", "__class__",
                                                            "bias", "1x"]): rnd.choice([2, 4, True, "cuda", 2**40])}}],
            "attrs": rnd.choice([[], [{"kind": "parameter"}], [{"kind": "buffer"}], [{"kind": "code"}]]),
            "state": rnd.choice([{}, {"a0": torch.zeros(2)}, {"m0.weight": torch.zeros(4, 2), "m0.bias": torch.zeros(4)}]),
            "nodes": [["placeholder", "x", [], {}],
                      [rnd.choice(["call_function", "call_method", "call_module", "get_attr", "output", "exec"]),
                       rnd.choice([fn, 0, 5, "a0", rnd.choice(DUNDERS)]), [{"$node": rnd.choice([0, 1, -1, 7])}],
                       rnd.choice([{}, {"dim": 1}, {"out": 1}, {"__class__": 1}, {"not an id": 1}])],
                      ["output", "output", [{"$node": 1}], {}]][: rnd.randrange(1, 4)],
        }

    # -- raw bytes --------------------------------------------------------------
    def raw(self) -> bytes:
        rnd = self.rnd
        r = rnd.randrange(8)
        if r == 0:
            return rnd.randbytes(rnd.randrange(1, 64))
        if r in (1, 2, 3) and self.corpus:  # mutate an encoding of an earlier structured message
            b = bytearray(rnd.choice(self.corpus))
            for _ in range(rnd.randint(1, 4)):
                op = rnd.randrange(4)
                pos = rnd.randrange(len(b)) if b else 0
                if op == 0 and b:
                    b[pos] ^= 1 << rnd.randrange(8)
                elif op == 1 and b:
                    b[pos] = rnd.choice([0xC0, 0xC1, 0xC7, 0xD4, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF, 0x91, 0x81])
                elif op == 2:
                    del b[pos:]
                else:
                    b[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
            return bytes(b) or b"\xc0"
        if r == 4:  # nesting just over and far over the limits
            return rnd.choice([b"\x81\xa1t\xa4call\x81\xa1a", b""]) + rnd.choice([b"\x91", b"\x81\xa1k"]) * rnd.choice(
                [33, 1000, 10_000]) + b"\xc0"
        if r == 5:  # maps with keys of types the schema refuses
            key = rnd.choice([1.5, b"t", None, True, (1, 2)])
            return msgpack.packb({"t": "call", key: 1}, use_bin_type=True, strict_types=False)
        if r == 6:  # ext codes, known and unknown, with junk payloads
            return msgpack.packb({"t": "call", "rid": 1, "kind": "func", "name": "torch.add",
                                  "args": [msgpack.ExtType(rnd.randrange(0, 128), rnd.randbytes(rnd.randrange(12)))]})
        # a non-map top level, or a map without a string "t"
        return msgpack.packb(rnd.choice([[1, 2], "call", 5, None, {"t": 5}, {"x": "call"}, {"t": None}]))


# ---------------------------------------------------------------------------
# the run


def build_pool(scientist: duet.Scientist) -> List[int]:
    """Small objects of every receiver kind, created the normal way."""
    ptrs = [
        scientist.send(torch.tensor([1.0, -2.0, 3.0, 0.5])),
        scientist.send(torch.arange(6, dtype=torch.int64).reshape(2, 3)),
        scientist.send(torch.tensor([True, False])),
        scientist.send(torch.tensor(2.5)),
        scientist.send(torch.zeros(0, 3)),
        scientist.send(torch.randn(2, 2, dtype=torch.complex64)),
        scientist.send(torch.ones(3, requires_grad=True)),
        scientist.send(torch.ones(4, dtype=torch.bfloat16)),
        scientist.send(np.arange(4, dtype=np.float64).reshape(2, 2)),
        scientist.send(np.array([1, 2, 3], dtype=np.int8)),
        scientist.send([1, 2, 3]),
        scientist.send({"a": torch.ones(2)}),
        scientist.send(3),
    ]
    lin = scientist.torch.nn.Linear(4, 2)
    ptrs += [lin, scientist.torch.optim.SGD(lin.parameters(), lr=0.1), scientist.torch.nn.ReLU(),
             scientist.store["ages"]]  # a private asset: its releases queue for the owner
    _barrier(scientist, 60)
    return ptrs


def still_serving(owner: duet.Owner, scientist: duet.Scientist) -> Optional[str]:
    """None if the owner still answers normally, else what is wrong."""
    try:
        if scientist.session.closed:
            return f"the session closed: {scientist.session.close_reason}"
        conns = owner.scientists
        if len(conns) != 1:
            return f"the owner lists {len(conns)} scientists"
        if not conns[0]._worker.is_alive():
            return "the owner's worker thread died"
        value = (scientist.send(torch.tensor([1.0, 2.0])) * 3 + 1).get(timeout=60)
        if not torch.equal(value, torch.tensor([4.0, 7.0])):
            return f"a normal op round trip returned {value!r}"
        _barrier(scientist, 60)
    except Exception as exc:  # noqa: BLE001 - report anything
        return f"a normal op round trip failed: {type(exc).__name__}: {exc}"
    return None


def fuzz(owner: duet.Owner, scientist: duet.Scientist, count: int, seconds: float, seed: int,
         barrier: int = 500, progress: bool = False) -> Dict[str, Any]:
    """Send up to `count` hostile inputs (stopping after `seconds`); returns counts."""
    pointers = build_pool(scientist)  # kept alive until the end: a dropped Pointer frees its object
    gen = Hostile(seed, [p.id for p in pointers], first_rid=10**9)
    transport = scientist.session.transport
    stats = {"structured": 0, "raw": 0, "refused_by_encoder": 0, "barriers": 0}
    start = time.perf_counter()
    deadline = start + seconds
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        if gen.rnd.random() < 0.2:
            transport.send(gen.raw())
            stats["raw"] += 1
        else:
            msg = gen.message()
            try:
                data = wire.encode(msg)
            except ProtocolError:
                stats["refused_by_encoder"] += 1
                data = msgpack.packb(msg["t"])  # still something hostile
            if len(gen.corpus) < 512 and len(data) < 4096:
                gen.corpus.append(data)
            elif gen.rnd.random() < 0.01 and len(data) < 4096:
                gen.corpus[gen.rnd.randrange(len(gen.corpus))] = data
            transport.send(data)
            stats["structured"] += 1
        sent += 1
        if sent % barrier == 0:
            _barrier(scientist, 120)
            stats["barriers"] += 1
            if progress and sent % (barrier * 20) == 0:
                el = time.perf_counter() - start
                print(f"  {sent:>8} inputs  {sent / el:8.0f}/s  rss {status_kb('VmRSS') // 1024} MB", flush=True)
    _barrier(scientist, 120)
    del pointers
    stats["inputs"] = sent
    stats["seconds"] = time.perf_counter() - start
    stats["objects_on_owner"] = len(owner.scientists[0].objects) if owner.scientists else -1
    stats["pending_requests"] = len(owner.requests.pending)
    return stats


def tiny_actions(owner: duet.Owner, scientist: duet.Scientist, n: int, barrier: int = 20_000) -> Dict[str, Any]:
    """n fire-and-forget `x.add_(1)` actions; a ping every `barrier` keeps under max_queued_actions."""
    x = scientist.send(torch.zeros(1, dtype=torch.float64))
    _barrier(scientist, 60)
    rss0 = status_kb("VmRSS")
    peak = rss0
    start = time.perf_counter()
    for i in range(1, n + 1):
        scientist._call("method", "add_", [x, 1], {}, want_result=False)
        if i % barrier == 0:
            _barrier(scientist, 300)
            peak = max(peak, status_kb("VmRSS"))
    _barrier(scientist, 300)
    seconds = time.perf_counter() - start
    value = x.get(timeout=60)
    peak = max(peak, status_kb("VmRSS"))
    return {"actions": n, "seconds": seconds, "rate": n / seconds, "value": float(value.item()),
            "rss_start_mb": rss0 / 1024, "rss_peak_growth_mb": (peak - rss0) / 1024,
            "objects_on_owner": len(owner.scientists[0].objects) if owner.scientists else -1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="hostile inputs to send (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=900.0, help="stop sending after this long (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--barrier", type=int, default=500, help="ping every N inputs (default %(default)s)")
    ap.add_argument("--tiny-actions", type=int, default=0, help="also send N x.add_(1) actions (e.g. 1000000)")
    ap.add_argument("--headroom-gb", type=float, default=3.0, help="RLIMIT_AS headroom (default %(default)s)")
    args = ap.parse_args()

    faulthandler.enable()
    # torch/numpy warn about odd arguments (overflow, deprecated forms): expected here, not worth printing.
    warnings.filterwarnings("ignore")
    cap_address_space(args.headroom_gb)
    counter, _saved = install_counter()
    limits = duet.Limits(max_objects=20_000, max_bytes=256 * 2**20, max_elements_per_object=2**24)
    owner, scientist = duet.local_pair(limits=limits)
    owner.store.add(torch.tensor([31.0, 45.0, 52.0, 29.0]), name="ages", description="fuzz asset")
    failures: List[str] = []
    rss_before = status_kb("VmRSS")
    print(f"fuzzing the owner's dispatcher: up to {args.count} inputs, {args.seconds:g} s, seed {args.seed}", flush=True)
    try:
        if args.count:
            stats = fuzz(owner, scientist, args.count, args.seconds, args.seed, args.barrier, progress=True)
            rate = stats["inputs"] / stats["seconds"]
            print(f"inputs sent         {stats['inputs']} ({stats['structured']} structured messages, "
                  f"{stats['raw']} raw byte strings; {stats['refused_by_encoder']} refused by our own encoder)")
            print(f"time                {stats['seconds']:.1f} s  ({rate:.0f} inputs/s, {stats['barriers']} ping barriers)")
            print(f"owner state after   {stats['objects_on_owner']} objects held, "
                  f"{stats['pending_requests']} release requests pending")
            problem = still_serving(owner, scientist)
            print(f"still serving       {'yes' if problem is None else 'NO: ' + problem}")
            if problem:
                failures.append(problem)
        if args.tiny_actions:
            r = tiny_actions(owner, scientist, args.tiny_actions)
            print(f"tiny actions        {r['actions']} x.add_(1) in {r['seconds']:.1f} s ({r['rate']:.0f}/s); "
                  f"final value {r['value']:.0f}; RSS {r['rss_start_mb']:.0f} MB at start, "
                  f"peak growth {r['rss_peak_growth_mb']:.0f} MB; {r['objects_on_owner']} objects on the owner")
            if r["value"] != args.tiny_actions:
                failures.append(f"tiny actions: final value {r['value']} != {args.tiny_actions}")
            problem = still_serving(owner, scientist)
            if problem:
                failures.append(problem)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"the fuzzer itself failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        scientist.close()
        owner.close()
    counts = ", ".join(f"{k} {v}" for k, v in sorted(counter.counts.items())) or "none"
    print(f"duet log records    {counts}")
    print(f"crashes (ERROR)     {counter.error_count}")
    for text in counter.errors:
        print("  " + text.replace("\n", "\n  "))
    if counter.error_count:
        failures.append(f"{counter.error_count} unexpected errors logged")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"memory              RSS {rss_before // 1024} MB after setup, peak {peak // 1024} MB (VmHWM)")
    if failures:
        print("FAIL: " + "; ".join(failures))
        return 1
    print("OK: zero crashes, the owner kept serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
