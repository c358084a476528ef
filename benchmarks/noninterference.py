"""Noninterference fuzzer: one random program, two owners whose private data differ.

Both owners publish assets with the same public facts (names, shapes, dtypes,
value ranges) and different private values. A hypothesis state machine runs
the same random program of allowlisted actions against both, in lockstep, and
after every step compares everything the scientist can observe without an
approval: each object's metadata reply (type, shape, dtype, requires_grad,
privacy, lineage, operations), the value of every object reported public,
error types and messages, and client-side errors. Any difference is a leak,
and hypothesis shrinks it to a minimal program.

The documented exception is the one-bit channel: whether an action succeeds
(a shape mismatch or an index out of range can depend on private values).
When only that differs, the program is stopped and the divergence is counted
separately (``STATS.side_channel``), never hidden and never called a leak.

Run a long budget (figures for benchmarks/README.md):

    .venv/bin/python benchmarks/noninterference.py --examples 3000 --steps 40

The test suite runs a short budget (tests/test_noninterference.py).
"""
from __future__ import annotations

import argparse
import collections
import operator
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, multiple, precondition, rule, run_state_machine_as_test
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import duet  # noqa: E402
from duet.scientist.pointer import Pointer  # noqa: E402

GET_TIMEOUT = 60.0


@dataclass
class Stats:
    programs: int = 0
    actions: int = 0
    observations: int = 0
    leaks: int = 0
    side_channel: "collections.Counter[str]" = field(default_factory=collections.Counter)
    ops: "collections.Counter[str]" = field(default_factory=collections.Counter)

    def summary(self) -> Dict[str, Any]:
        return {
            "programs": self.programs,
            "actions": self.actions,
            "observations": self.observations,
            "leaks": self.leaks,
            "side_channel_divergences": sum(self.side_channel.values()),
            "side_channel_by_op": dict(self.side_channel.most_common()),
            "distinct_ops": len(self.ops),
        }


STATS = Stats()


class Leak(AssertionError):
    """The two runs differ in something observable without approval."""


# -- the two owners -----------------------------------------------------------------------
def _secrets(seed: int) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": (torch.rand(8, generator=g) * 100).round(),  # ages-like values in [0, 100]
        "m": torch.randn(3, 4, generator=g),
        "ids": torch.randint(0, 5, (6,), generator=g),
        "xn": np.random.default_rng(seed).integers(0, 100, 6).astype(np.float64),
        "ds": torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)),
        "recs": Records(torch.randint(1, 6, (6,), generator=g).tolist()),  # records of private lengths
    }


BOUNDS = {"x": (0, 100), "xn": (0, 100), "ids": (0, 4)}


class Records(torch.utils.data.Dataset):
    """A dataset whose samples' shapes are private (visits per patient)."""

    def __init__(self, lengths: List[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.ones(self.lengths[i])


class World:
    """One owner with one scientist; everything the scientist does here is also done in the other world."""

    def __init__(self, seed: int, tmp: Path) -> None:
        self.owner, self.scientist = duet.local_pair(audit_log=tmp / f"audit-{seed}-{time.monotonic_ns()}.jsonl")
        for name, value in _secrets(seed).items():
            # Declared bounds give these values DP facts, whose visible part (meta()["dp"]) is compared too.
            self.owner.store.add(value, name=name, **({"bounds": BOUNDS[name]} if name in BOUNDS else {}))
        self.scientist.torch.manual_seed(0)
        self.values: List[Any] = []  # pointers (and plain results) by handle index

    def close(self) -> None:
        try:
            self.scientist.close()
        finally:
            self.owner.close()


def _canonical(value: Any, depth: int = 0) -> Any:
    """A value reduced to something == compares exactly (bitwise for tensors and arrays)."""
    if depth > 10:
        return "..."
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        return ("T", t.dtype, tuple(t.shape), bool(value.requires_grad), t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    if isinstance(value, np.ndarray):
        return ("A", value.dtype.str, value.shape, np.ascontiguousarray(value).tobytes())
    if isinstance(value, np.generic):
        return ("G", type(value).__name__, value.tobytes())
    if isinstance(value, float):
        return ("f", np.float64(value).tobytes())
    if isinstance(value, nn.Module):
        return ("M", type(value).__name__, tuple((k, _canonical(v, depth + 1)) for k, v in value.state_dict().items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_canonical(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("d", tuple((k, _canonical(v, depth + 1)) for k, v in value.items()))
    return (type(value).__name__, repr(value))


class Infrastructure(RuntimeError):
    """The harness could not observe (a timeout or a dropped link): neither a leak nor a side channel."""


def _outcome(fn: Callable[[], Any]) -> Tuple[str, Any]:
    try:
        return ("ok", fn())
    except (duet.RequestTimeout, duet.ConnectionLost, TimeoutError) as exc:
        raise Infrastructure(f"could not observe: {exc}") from exc
    except duet.DuetError as exc:
        return ("error", (type(exc).__name__, str(exc)))
    except Exception as exc:  # client-side Python errors must match too
        return ("error", (type(exc).__name__, str(exc)))


# -- sent models -----------------------------------------------------------------------------
class CopyInto(nn.Module):
    def forward(self, src, dst):
        dst.copy_(src)
        return src.sum()


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.fc(x)))


MODELS = {"copy": CopyInto, "small": Small}


@duet.plan
def plan_mix(a, b):
    return (a * b).sum() + a.mean()


@duet.plan
def plan_inplace(a, b):
    a.add_(b)
    return a.max()


# -- the state machine ---------------------------------------------------------------------------
BINARY = ["add", "sub", "mul", "truediv", "gt", "lt", "eq", "matmul", "getitem", "and_", "or_"]
UNARY_METHODS = [
    "sum", "mean", "max", "min", "argmax", "abs", "exp", "relu", "sigmoid", "float", "long", "t", "clone",
    "detach", "item", "tolist", "nonzero", "unique", "cumsum", "numel", "dim", "bool", "sort", "flatten",
    "contiguous", "argsort", "std", "norm", "sign", "round",
]
INPLACE = ["add_", "mul_", "copy_", "sub_", "clamp_", "fill_", "zero_", "resize_as_", "div_", "masked_fill_"]
FACTORIES = ["zeros", "ones", "empty", "rand", "randn", "arange", "full", "randperm", "randint", "poisson", "bernoulli",
             "rand_like", "randn_like", "zeros_like", "empty_like", "bincount", "repeat_interleave", "one_hot", "where"]
NUMPY = ["add", "sum", "nonzero", "unique", "dot_out", "mean", "asarray", "random_randint", "random_normal", "cumsum",
         "sort", "flatnonzero", "clip", "maximum"]
LITERALS = st.one_of(st.integers(-3, 10), st.floats(-3, 3, allow_nan=False, width=32), st.booleans(),
                     st.just(slice(0, 3)), st.just(slice(None, None, 2)))


def _case_empty_grow(s: Any, x: Any) -> Any:
    lst = s.send([torch.zeros(0)])
    e = lst[0]
    e.resize_as_(s.torch.zeros(8))
    e.copy_(x.float().reshape(-1)[:8])
    return lst


def _case_overwrite(s: Any, x: Any) -> Any:
    q = s.send(np.zeros(1))
    q[:] = x.float().reshape(-1)[:1]
    pub = s.send(torch.arange(99.0, -1.0, -1.0, dtype=torch.float64))
    s.numpy.percentile(pub, q.clip(0, 100), overwrite_input=True, method="lower")
    return pub


def _case_module_midway(s: Any, x: Any) -> Any:
    nn = s.torch.nn
    bn = nn.BatchNorm1d(4)
    nn.Sequential(nn.Embedding(50, 4), bn, nn.Linear(5, 1))(x.long().reshape(-1).abs())
    return bn


def _case_dtype_message(s: Any, x: Any) -> Any:
    words = s.send(["a" * (k + 1) for k in range(20)])
    return s.numpy.array(words[x.long().reshape(-1)[0].clamp(0, 19).item()])


def _case_small_int(s: Any, x: Any) -> Any:
    lst = s.send([0, 0, 0])
    lst[0] = (x.float().reshape(-1)[0] > 50).long().item()
    return lst


def _case_two_pointers(s: Any, x: Any) -> Any:
    lst = s.send([torch.zeros(1)])
    lst[0].resize_as_(x[x > 0])
    return lst[0]


def _case_module_flag(s: Any, x: Any) -> Any:
    child = s.torch.nn.Linear(2, 2)
    s.torch.nn.Sequential(child).train((x.float().reshape(-1)[0] > 50).item())
    return child.training


def _case_records(s: Any, x: Any) -> Any:
    return next(iter(s.loader("recs", batch_size=1, progress=False)))


@duet.plan
def _plan_midway(x, w, torch_ns):
    torch_ns.index_select(w, 0, x[0:1].long().abs())
    torch_ns.index_select(w, 0, (x[1:2] * 2).long().abs())
    return torch_ns.nn.functional.embedding(x[0:1].long() * 0 + 1000, w)


def _case_plan_midway(s: Any, x: Any) -> Any:
    w = s.send(torch.zeros(50, 1))
    _plan_midway(x.float().reshape(-1), w, s.torch)
    return w


def _case_skipped_twin(s: Any, x: Any) -> Any:
    lst = s.send([torch.zeros(1)])
    twin = lst[0]
    lst[(x.float().reshape(-1)[0] * 0).long().item()].resize_as_(x[x > 0])
    return twin


def _case_rid_reuse(s: Any, x: Any) -> Any:
    base = s.torch.zeros(4)
    view = base.view(4)
    s._send_with_frees({"t": "call", "rid": base._rid, "kind": "method", "name": "view",
                        "args": s._encode_args([base, 4]), "kwargs": {}})
    view.copy_(x.float().reshape(-1)[:1].expand(4))
    return base


REVIEW_CASES = {
    "empty_grow": _case_empty_grow, "overwrite_input": _case_overwrite, "module_midway": _case_module_midway,
    "dtype_message": _case_dtype_message, "small_int": _case_small_int, "two_pointers": _case_two_pointers,
    "module_flag": _case_module_flag, "records": _case_records, "plan_midway": _case_plan_midway,
    "skipped_twin": _case_skipped_twin, "rid_reuse": _case_rid_reuse,
}


class Noninterference(RuleBasedStateMachine):
    """Two worlds, one program; see the module docstring."""

    handles = Bundle("handles")
    tmp: Path = Path("/tmp")

    def __init__(self) -> None:
        super().__init__()
        self.worlds: List[World] = []
        self.count = 0
        self.diverged = False
        STATS.programs += 1

    # -- running one action in both worlds ----------------------------------------------------
    def _apply(self, op: str, fn: Callable[..., Any], *hs: int) -> Any:
        """Run fn(scientist, *values) in both worlds; a new handle if the results are pointers.

        Otherwise `multiple()`: nothing goes into the bundle (a refusal at the call site, alike in
        both worlds, leaves no value to use later).
        """
        STATS.actions += 1
        STATS.ops[op] += 1
        outs = []
        made: List[List[Pointer]] = []
        for w in self.worlds:
            args = [w.values[h] for h in hs]
            with _Collect(w.scientist) as created:
                outs.append(_outcome(lambda: fn(w.scientist, *args)))
            made.append(created.pointers)
        self._compare(op, "client", outs)
        if self.diverged:
            return multiple()
        self._compare(op, "ping", [_outcome(lambda w=w: w.scientist.ping(timeout=GET_TIMEOUT) and None) for w in self.worlds])
        # Every intermediate object of a composite step must have failed, or not, alike.
        for pa, pb in zip(*made):
            if self.diverged:
                return multiple()
            self._compare(op, "intermediate", [_outcome(lambda p=p: p.meta(timeout=GET_TIMEOUT)) for p in (pa, pb)])
        if self.diverged:
            return multiple()
        (ka, va), (kb, vb) = outs
        if ka != "ok":
            return multiple()
        if isinstance(va, Pointer) != isinstance(vb, Pointer):
            raise Leak(f"{op}: a pointer in one run, a value in the other")
        if not isinstance(va, Pointer) and _canonical(va) != _canonical(vb):
            raise Leak(f"{op}: client-side results differ: {va!r} vs {vb!r}")
        self.worlds[0].values.append(va)
        self.worlds[1].values.append(vb)
        self.count += 1
        self._observe_all(op)
        return self.count - 1

    def _compare(self, op: str, what: str, outs: List[Tuple[str, Any]]) -> None:
        (ka, va), (kb, vb) = outs
        if ka != kb or (ka == "error" and va[0] != vb[0]):
            STATS.side_channel[op] += 1
            self.diverged = True  # success or failure differs: the documented one-bit channel
            return
        if ka == "error" and va != vb:
            raise Leak(f"{op} ({what}): error messages differ: {va} vs {vb}")

    def _observe_all(self, op: str) -> None:
        for h in range(self.count):
            if self.diverged:
                return
            self._observe(op, h)

    def _observe(self, op: str, h: int) -> None:
        ptrs = [w.values[h] for w in self.worlds]
        if not isinstance(ptrs[0], Pointer):
            return
        STATS.observations += 1
        metas = [_outcome(lambda p=p: p.meta(timeout=GET_TIMEOUT)) for p in ptrs]
        self._compare(op, f"meta of #{h}", metas)
        if self.diverged or metas[0][0] != "ok":
            return
        if metas[0][1] != metas[1][1]:
            raise Leak(f"after {op}: metadata of #{h} differs:\n  {metas[0][1]}\n  {metas[1][1]}")
        if metas[0][1]["private"]:
            return
        values = [_outcome(lambda p=p: p.get(timeout=GET_TIMEOUT)) for p in ptrs]
        self._compare(op, f"value of #{h}", values)
        if self.diverged or values[0][0] != "ok":
            return
        if _canonical(values[0][1]) != _canonical(values[1][1]):
            raise Leak(f"after {op}: public object #{h} ({metas[0][1]['assets']}, ops {metas[0][1]['ops']}) "
                       f"differs:\n  {values[0][1]!r}\n  {values[1][1]!r}")

    # -- setup ------------------------------------------------------------------------------------
    @initialize(target=handles, seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)).filter(lambda s: s[0] != s[1]))
    def start(self, seeds: Tuple[int, int]) -> Any:
        self.worlds = [World(seeds[0], self.tmp), World(seeds[1], self.tmp)]
        made = []
        for name in ("x", "m", "ids", "xn"):
            made.append(self._apply(f"store[{name}]", lambda s, n=name: s.store[n]))
        made.append(self._apply("send", lambda s: s.send(torch.arange(8.0))))
        made.append(self._apply("send", lambda s: s.send(torch.ones(3, 4))))
        return multiple(*[m for m in made if isinstance(m, int)])

    def teardown(self) -> None:
        for w in self.worlds:
            try:
                w.close()
            except Exception:
                pass

    # -- rules ---------------------------------------------------------------------------------
    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, b=handles, op=st.sampled_from(BINARY))
    def binary(self, a: int, b: int, op: str) -> Any:
        return self._apply(f"operator.{op}", lambda s, x, y: getattr(operator, op)(x, y), a, b)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, lit=LITERALS, op=st.sampled_from(["add", "mul", "gt", "getitem", "pow", "truediv"]))
    def binary_literal(self, a: int, lit: Any, op: str) -> Any:
        return self._apply(f"operator.{op}(lit)", lambda s, x: getattr(operator, op)(x, lit), a)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, m=st.sampled_from(UNARY_METHODS))
    def method(self, a: int, m: str) -> Any:
        return self._apply(f"Tensor.{m}", lambda s, x: getattr(x, m)(), a)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, m=st.sampled_from(["size", "view", "reshape", "sum", "max", "unsqueeze", "repeat"]),
          arg=st.integers(-1, 3))
    def method_int(self, a: int, m: str, arg: int) -> Any:
        return self._apply(f"Tensor.{m}(int)", lambda s, x: getattr(x, m)(arg), a)

    @precondition(lambda self: not self.diverged)
    @rule(a=handles, b=handles, m=st.sampled_from(INPLACE))
    def inplace(self, a: int, b: int, m: str) -> None:
        def go(s: Any, x: Any, y: Any) -> Any:
            if m in ("fill_", "zero_"):
                return getattr(x, m)(*(() if m == "zero_" else (y,)))
            if m == "clamp_":
                return x.clamp_(min=y)
            if m == "masked_fill_":
                return x.masked_fill_(y, 1.0)
            return getattr(x, m)(y)

        self._apply(f"Tensor.{m}", go, a, b)

    @precondition(lambda self: not self.diverged)
    @rule(a=handles, key=handles, b=handles)
    def setitem(self, a: int, key: int, b: int) -> None:
        def go(s: Any, x: Any, k: Any, y: Any) -> Any:
            x[k] = y
            return None

        self._apply("operator.setitem", go, a, key, b)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, f=st.sampled_from(FACTORIES))
    def factory(self, a: int, f: str) -> Any:
        def go(s: Any, x: Any) -> Any:
            T = s.torch
            return {
                "zeros": lambda: T.zeros(x), "ones": lambda: T.ones([2, x]), "empty": lambda: T.empty(4),
                "rand": lambda: T.rand(3), "randn": lambda: T.randn(2, 2), "arange": lambda: T.arange(x),
                "full": lambda: T.full([3], x), "randperm": lambda: T.randperm(6), "randint": lambda: T.randint(0, x, (3,)),
                "poisson": lambda: T.poisson(x), "bernoulli": lambda: T.bernoulli(x), "rand_like": lambda: T.rand_like(x),
                "randn_like": lambda: T.randn_like(x), "zeros_like": lambda: T.zeros_like(x),
                "empty_like": lambda: T.empty_like(x), "bincount": lambda: T.bincount(x),
                "repeat_interleave": lambda: T.repeat_interleave(x), "one_hot": lambda: T.nn.functional.one_hot(x),
                "where": lambda: T.where(x),
            }[f]()

        return self._apply(f"torch.{f}", go, a)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, b=handles, f=st.sampled_from(NUMPY))
    def numpy_op(self, a: int, b: int, f: str) -> Any:
        def go(s: Any, x: Any, y: Any) -> Any:
            N = s.numpy
            return {
                "add": lambda: N.add(x, y), "sum": lambda: N.sum(x), "nonzero": lambda: N.nonzero(x),
                "unique": lambda: N.unique(x), "dot_out": lambda: N.dot(x, x, y), "mean": lambda: N.mean(x),
                "asarray": lambda: N.asarray(x), "random_randint": lambda: N.random.randint(0, x),
                "random_normal": lambda: N.random.normal(0, 1, 3), "cumsum": lambda: N.cumsum(x),
                "sort": lambda: N.sort(x), "flatnonzero": lambda: N.flatnonzero(x), "clip": lambda: N.clip(x, 0, y),
                "maximum": lambda: N.maximum(x, y),
            }[f]()

        return self._apply(f"numpy.{f}", go, a, b)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, b=handles, kind=st.sampled_from(["pick", "pick_mixed", "concat", "tolist", "sizes"]))
    def python_list(self, a: int, b: int, kind: str) -> Any:
        return self._apply(f"list.{kind}", lambda s, x, y: _remote_list(s, x, y, kind), a, b)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, b=handles, kind=st.sampled_from(["tensor", "keyword", "inputs", "retain"]))
    def autograd(self, a: int, b: int, kind: str) -> Any:
        def go(s: Any, x: Any, y: Any) -> Any:
            w = s.send(torch.ones(8)).requires_grad_()
            h = w * 2
            if kind == "retain":
                h.retain_grad()
            loss = (h * x.float().reshape(-1)[:1].sum() + (h * 0).sum()).sum()
            if kind == "keyword":
                s.torch.autograd.backward(tensors=[loss])
            elif kind == "inputs":
                loss.backward(inputs=[h])
            else:
                loss.backward()
            return (h if kind in ("retain", "inputs") else w).grad

        return self._apply(f"autograd.{kind}", go, a, b)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, kind=st.sampled_from(["batch_norm", "instance_norm", "embedding", "linear_train",
                                                           "load_assign", "state_dict_dest", "model_copy", "model_small",
                                                           "plan_mix", "plan_inplace", "loader", "data_alias", "adam_fused"]))
    def nn_op(self, a: int, kind: str) -> Any:
        def go(s: Any, x: Any) -> Any:
            F = s.torch.nn.functional
            if kind == "batch_norm":
                rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
                F.batch_norm(x.float().reshape(-1, 2), rm, rv, training=True)
                return rm
            if kind == "instance_norm":
                rm, rv = s.send(torch.zeros(2)), s.send(torch.ones(2))
                F.instance_norm(x.float().reshape(1, 2, -1), running_mean=rm, running_var=rv, use_input_stats=True)
                return rv
            if kind == "embedding":
                wt = s.send(torch.full((10, 3), 5.0))
                F.embedding(x.long().clamp(0, 9), wt, max_norm=1.0)
                return wt
            if kind == "linear_train":
                lin = s.torch.nn.Linear(1, 1)
                opt = s.torch.optim.SGD(lin.parameters(), lr=0.1)
                lin(x.float().reshape(-1, 1)).sum().backward()
                opt.step()
                return lin.weight
            if kind == "adam_fused":
                p = s.send(torch.zeros(1)).requires_grad_()
                opt = s.torch.optim.Adam([p], lr=0.1, fused=True)
                (p * x.float().sum()).sum().backward()
                opt.step()
                return p
            if kind == "load_assign":
                lin = s.torch.nn.Linear(1, 1)
                wt, bt = s.send(torch.zeros(1, 1)), s.send(torch.zeros(1))
                lin.load_state_dict({"weight": wt, "bias": bt}, assign=True)
                opt = s.torch.optim.SGD(lin.parameters(), lr=0.1)
                lin(x.float().reshape(-1, 1)).sum().backward()
                opt.step()
                return wt
            if kind == "state_dict_dest":
                lin = s.torch.nn.Linear(1, 1)
                dest = s.send({})
                lin.state_dict(destination=dest)
                opt = s.torch.optim.SGD(lin.parameters(), lr=0.1)
                lin(x.float().reshape(-1, 1)).sum().backward()
                opt.step()
                return dest
            if kind == "model_copy":
                torch.manual_seed(3)
                model = s.send(CopyInto())
                dst = s.send(torch.zeros(8))
                model(x.float().reshape(-1)[:8], dst)
                return dst
            if kind == "model_small":
                torch.manual_seed(3)  # the scientist's local init: the same in both runs
                model = s.send(Small())
                out = model(x.float().reshape(-1, 4))
                return model if out is not None else out
            if kind == "plan_mix":
                return plan_mix(x.float(), s.send(torch.ones(1)))
            if kind == "plan_inplace":
                mine = s.send(torch.zeros(1))
                plan_inplace(mine, x.float().sum())
                return mine
            if kind == "loader":
                loader = s.loader("ds", batch_size=4, shuffle=True, seed=1, progress=False)
                xb, yb = next(iter(loader))
                return xb.mean() + x.float().sum() * 0
            if kind == "data_alias":
                mine = s.send(torch.ones(8))
                w = s.send(torch.ones(8)).requires_grad_()
                loss = (w * mine).sum()
                mine.data.copy_(x.float().reshape(-1)[:8])
                loss.backward()
                return w.grad
            raise AssertionError(kind)

        return self._apply(f"nn.{kind}", go, a)

    @precondition(lambda self: not self.diverged)
    @rule(target=handles, a=handles, kind=st.sampled_from(sorted(REVIEW_CASES)))
    def review_case(self, a: int, kind: str) -> Any:
        """Shapes of attack a hostile review found (each one closed), with the fuzzer's operands."""
        return self._apply(f"case.{kind}", REVIEW_CASES[kind], a)

    @precondition(lambda self: not self.diverged)
    @rule(a=handles, what=st.sampled_from(["shape", "dtype", "private"]))
    def metadata(self, a: int, what: str) -> None:
        self._apply(f".{what}", lambda s, x: getattr(x, what) if isinstance(x, Pointer) else None, a)

    @rule()
    def idle(self) -> None:
        """Always possible, so a program stopped at a side-channel divergence can end quietly."""


class _Collect:
    """Every pointer a scientist hands out while active (intermediates of a composite step)."""

    def __init__(self, scientist: Any) -> None:
        self.scientist = scientist
        self.pointers: List[Pointer] = []

    def __enter__(self) -> "_Collect":
        client = self.scientist
        original = type(client)._call

        def call(this: Any, *a: Any, **k: Any) -> Any:
            out = original(this, *a, **k)
            if isinstance(out, Pointer):
                self.pointers.append(out)
            return out

        client._call = call.__get__(client)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.scientist._call


def _remote_list(s: Any, x: Any, y: Any, kind: str) -> Any:
    """Python lists on the owner: picking by a (maybe private) index, concatenation, sizes from values."""
    if kind == "pick":
        choices = s.send([torch.zeros(1), torch.zeros(5)])
        return choices[(x.float().sum() > 50).long().item()]
    if kind == "pick_mixed":  # a tensor in one run, an array or a number in the other
        choices = s.send([torch.zeros(2), np.zeros(2), 3])
        picked = choices[(x.float().sum() > 50).long().item() + (y.float().sum() > 50).long().item()]
        return picked.sum()
    if kind == "concat":
        return operator.add(s.send([0]), x.long().reshape(-1)[:2].tolist())
    if kind == "tolist":
        return y.reshape(-1)[:3].tolist()
    return s.torch.zeros([0] + x.long().reshape(-1)[:2].clamp(0, 3).tolist())


def run(examples: int, steps: int, tmp: Path, seed: Optional[int] = None, shrink: bool = True) -> Dict[str, Any]:
    """Run the fuzzer; raises Leak (with hypothesis's minimal program) on any difference."""
    from hypothesis import Phase

    global STATS
    STATS = Stats()
    Noninterference.tmp = tmp
    cfg = settings(
        phases=[p for p in Phase if shrink or p not in (Phase.shrink, Phase.explain)],
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=seed is not None,
        database=None,
        print_blob=True,
        report_multiple_bugs=False,
    )
    start = time.perf_counter()
    if seed is not None:
        import random

        random.seed(seed)
    run_state_machine_as_test(Noninterference, settings=cfg)
    out = STATS.summary()
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=1000, help="random programs to try")
    ap.add_argument("--steps", type=int, default=30, help="actions per program (at most)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-shrink", action="store_true", help="report the first failing program as found")
    args = ap.parse_args(argv)
    import json
    import logging
    import tempfile
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")  # torch and numpy warn about the odd arguments random programs pass
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run(args.examples, args.steps, Path(tmp), args.seed, shrink=not args.no_shrink)
        except BaseException as exc:
            print(json.dumps({"leak": isinstance(exc, Leak), "error": type(exc).__name__, **STATS.summary()}, indent=1))
            raise
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
