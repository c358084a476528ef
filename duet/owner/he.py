"""Computing on the scientist's encrypted data (CKKS, TenSEAL): the owner never holds the secret key.

The scientist sends a public TenSEAL context once (`RequestKind.HE_CONTEXT`: keys to compute with,
refused if it holds the secret key) and then `duet.ciphertext.Ciphertext` values. Here they become
`Encrypted`: one or more CKKS vectors read as one vector. What can be done with them is a short
list, `run`: add, subtract or multiply (another encrypted vector or plain numbers), negate, sum, `dot` with a plain vector, `mm`/`@` with a plain matrix, and calling a
model made of `nn.Linear` layers and polynomial activations (`duet.he.Square`,
`duet.he.Polynomial`, in an `nn.Sequential` or alone) - the owner's published model, or one the
scientist sent. Every multiplication (by plain numbers too) spends one multiplicative level, and
the default context has two: a Linear layer and a square. Past that, TenSEAL refuses.

A vector-matrix product is one `dot` per output column (0.03 s each at 784 inputs), not TenSEAL's
`mm` (7 s for 784x10 here), so a product's result has one part per output.

Slots. A CKKS vector has 4,096 slots (poly modulus 8192) whatever its size says, and the secret key
opens all of them. TenSEAL sums a vector of n numbers by rotations over n, which leaves partial
sums of its products in the other slots: one released prediction of a Linear layer would give the
scientist every weight. So every vector here spans all slots: plain operands are padded with zeros
(a product with a plain vector zeroes whatever the scientist put past its numbers), sums rotate
over all slots (every slot then holds the same total), and only the release says how many numbers
a vector holds (`sizes`). What the other slots can still carry: the same slot-wise computation on
the scientist's own padding (an elementwise computation answers for every slot the scientist
filled), never a partial sum.

Lineage is the executor's: a result computed with a private plain value (a published model's
weights) is private and leaves only with approval, as a Ciphertext only the scientist can open.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..ciphertext import CONTEXT, VECTOR, Ciphertext
from ..errors import NotAllowed

MAX_CONTEXT_BYTES = 128 << 20  # a public context with Galois keys at poly modulus 8192 is ~34 MiB
MAX_POLY_MODULUS = 16384
MAX_OUTPUTS = 4096  # outputs of one encrypted vector-matrix product (one CKKS vector each)
MAX_PARTS_PER_ACTION = 2048  # CKKS vectors one action may make in all (each ~0.4 MiB and ~25 ms of work)
_action = threading.local()  # the current action's count of vectors made, and its memory check


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:  # pragma: no cover - an extra
        raise NotAllowed("the owner cannot compute on encrypted data: TenSEAL is not installed "
                         "(pip install 'duet-p2p[encrypted]')") from None
    return tenseal


def honest_galois_keys(degree: int) -> int:
    """How many Galois keys TenSEAL makes for a poly modulus: rotations by each power of two, both ways."""
    return 2 * (degree // 2).bit_length() - 2


class HEContext:
    """The scientist's public context on this owner: what its ciphertexts are bound to."""

    def __init__(self, data: Ciphertext) -> None:
        if data.kind != CONTEXT:
            raise NotAllowed("expected a public CKKS context")
        raw = data.parts[0]
        if len(raw) > MAX_CONTEXT_BYTES:
            raise NotAllowed(f"a public context of {len(raw) >> 20} MiB is larger than {MAX_CONTEXT_BYTES >> 20} MiB")
        if hashlib.sha256(raw).digest() != data.context:
            raise NotAllowed("the context does not match its digest")
        ts = _tenseal()
        try:
            ctx = ts.context_from(raw)
        except Exception:
            raise NotAllowed("not a TenSEAL context") from None
        if ctx.is_private():
            # The secret key must stay with the scientist: refuse it, and keep no reference to it.
            del ctx
            raise NotAllowed("this context holds the secret key: send only the public part "
                             "(scientist.he.context() does)")
        degree = ctx.data.seal_context().first_context_data().parms().poly_modulus_degree()
        if degree > MAX_POLY_MODULUS:
            raise NotAllowed(f"poly modulus degree {degree} is above {MAX_POLY_MODULUS}")
        seal_context = ctx.data.seal_context()
        moduli = int(seal_context.key_context_data().chain_index()) + 1  # the key level holds every modulus
        try:
            galois_keys = int(ctx.data.galois_keys().size())
        except Exception:
            galois_keys = 0
        honest = honest_galois_keys(degree)
        if galois_keys > honest:
            raise NotAllowed(f"a public context with {galois_keys} Galois keys (scientist.he.context() makes {honest})")
        self.context = ctx
        self.digest = data.context
        # What it holds in memory, not on the wire (keys of zeros compress to nothing): each key is
        # (moduli - 1) pairs of polynomials over all the moduli.
        key_bytes = (moduli - 1) * 2 * moduli * degree * 8
        self.nbytes = max(len(raw), (galois_keys + 1) * key_bytes)
        self.slots = degree // 2
        self.first_parms = list(seal_context.first_parms_id())
        self.part_bytes = 2 * (moduli - 1) * degree * 8  # a fresh ciphertext: two polynomials

    def widen(self, vector: Any) -> Any:
        """The same ciphertext, read as a vector of all the context's slots."""
        if int(vector.size()) == self.slots:
            return vector
        return _tenseal().ckks_vector_from(self.context, with_size(vector.serialize(), self.slots))


def with_size(raw: bytes, size: int) -> bytes:
    """A serialized TenSEAL CKKS vector (CKKSVectorProto: 1 sizes, 2 ciphertexts, 3 scale), said to
    hold `size` numbers: how many slots TenSEAL's sums rotate over and its decrypt returns. Read
    only from TenSEAL's own serialization; the ciphertext itself is not touched."""
    at, ciphertexts, scale = 0, [], b""
    while at < len(raw):
        tag, at = _varint(raw, at)
        field, kind = tag >> 3, tag & 7
        if kind == 2:
            length, at = _varint(raw, at)
            if field == 2:
                ciphertexts.append(raw[at:at + length])
            at += length
        elif kind == 1 and field == 3:
            scale, at = raw[at:at + 8], at + 8
        elif kind == 0:
            _, at = _varint(raw, at)
        else:
            raise NotAllowed("an unexpected CKKS vector encoding")
    if len(ciphertexts) != 1 or len(scale) != 8:
        raise NotAllowed("an unexpected CKKS vector encoding")
    sizes = _to_varint(size)
    return (b"\x0a" + _to_varint(len(sizes)) + sizes + b"\x12" + _to_varint(len(ciphertexts[0])) + ciphertexts[0]
            + b"\x19" + scale)


def _varint(raw: bytes, at: int) -> tuple:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise NotAllowed("an unexpected CKKS vector encoding")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _to_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class Encrypted:
    """Encrypted numbers on the owner: CKKS vectors (TenSEAL) read as one vector, in order."""

    __slots__ = ("parts", "context", "sizes", "replicated", "carries", "clean")

    def __init__(self, parts: List[Any], context: HEContext, sizes: Sequence[int], replicated: bool = False,
                 carries: int = 0, clean: bool = False, spent: bool = False) -> None:
        self.parts = parts  # each spans all of the context's slots (see the module's docstring)
        self.context = context
        if not spent:
            _spend(len(parts), context)
        # Whether the slots past each part's numbers hold zeros. A fresh ciphertext's do not
        # (TenSEAL repeats the numbers there, and a scientist may put anything): a sum over all
        # slots would add them in, so an unclean vector is masked first (one level).
        self.clean = clean
        self.sizes = list(sizes)  # how many of each part's slots are its numbers
        # One number per part, in every slot (a sum's or a product's result): plain numbers then
        # go to every slot too, so the other slots stay copies (a bias added to one slot only
        # would show as the difference).
        self.replicated = replicated
        # How many of the owner's plain numbers (weights, coefficients, operands) went into it. CKKS
        # hides nothing from the key holder about how a result was computed (no circuit privacy),
        # and a scientist that made its own keys can read them all from one result (a review did,
        # with Galois keys of its own making): a release of this counts them (duet.owner.host).
        self.carries = carries

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def __sizeof__(self) -> int:
        return self.context.part_bytes * len(self.parts)

    def __repr__(self) -> str:
        return f"<Encrypted: {self.size} numbers in {len(self.parts)} CKKS vector(s)>"

    @classmethod
    def from_wire(cls, data: Ciphertext, context: Optional[HEContext]) -> "Encrypted":
        if context is None:
            raise NotAllowed("no encryption context yet: make one with scientist.he.context()")
        if data.kind != VECTOR:
            raise NotAllowed("expected encrypted numbers")
        if data.context != context.digest:
            raise NotAllowed("these ciphertexts belong to another encryption context")
        ts = _tenseal()
        parts = []
        for raw, size in zip(data.parts, data.sizes):
            try:
                v = ts.ckks_vector_from(context.context, raw)
            except Exception:
                raise NotAllowed("a ciphertext TenSEAL cannot read") from None
            if int(v.size()) != size or size > context.slots:
                raise NotAllowed("a ciphertext's size is not what it says")
            ct = v.data.ciphertext()
            if len(ct) != 1 or ct[0].size() != 2 or list(ct[0].parms_id()) != context.first_parms or \
                    abs(ct[0].scale / context.context.global_scale - 1) > 1e-9:
                raise NotAllowed("a ciphertext that is not fresh (two polynomials, at the context's first level "
                                 "and scale): encrypt with scientist.he")
            parts.append(context.widen(v))
        return cls(parts, context, data.sizes)

    def to_wire(self) -> Ciphertext:
        """What a release sends: the serialized vectors (only the secret key opens them)."""
        return Ciphertext(VECTOR, self.context.digest,
                          tuple(with_size(p.serialize(), n) for p, n in zip(self.parts, self.sizes)), tuple(self.sizes))

    # -- operations -----------------------------------------------------------------------
    def _plain_parts(self, other: Any) -> List[List[float]]:
        """A plain operand cut to this vector's parts (a number is broadcast)."""
        pad = self.context.slots
        if self.replicated:
            flat = [float(other)] * len(self.parts) if isinstance(other, (int, float)) and not isinstance(other, bool) \
                else _plain_vector(other)
            if len(flat) != len(self.parts):
                raise NotAllowed(f"a plain operand of {len(flat)} numbers for {self.size} encrypted ones")
            return [[v] * pad for v in flat]
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return [[float(other)] * n + [0.0] * (pad - n) for n in self.sizes]
        flat = _plain_vector(other)
        if len(flat) != self.size:
            raise NotAllowed(f"a plain operand of {len(flat)} numbers for {self.size} encrypted ones")
        out, at = [], 0
        for n in self.sizes:
            out.append(flat[at:at + n] + [0.0] * (pad - n))
            at += n
        return out

    def _same(self, other: "Encrypted") -> None:
        if other.context is not self.context:
            raise NotAllowed("encrypted values of two contexts")
        if other.sizes != self.sizes:
            raise NotAllowed("encrypted vectors of different layouts")
        if other.replicated != self.replicated:
            # The other slots of one are copies of a result, of the other the scientist's padding:
            # combined, they would answer the computation for inputs the release does not show.
            raise NotAllowed("the result of a sum or product combines only with other such results or plain numbers")

    def add(self, other: Any) -> "Encrypted":
        if isinstance(other, Encrypted):
            self._same(other)
            return Encrypted([a + b for a, b in zip(self.parts, other.parts)], self.context, self.sizes,
                             self.replicated and other.replicated, self.carries + other.carries,
                             clean=self.clean and other.clean)
        return Encrypted([a + b for a, b in zip(self.parts, self._plain_parts(other))], self.context, self.sizes,
                         self.replicated, self.carries + _count(other), clean=self.clean)

    def sub(self, other: Any) -> "Encrypted":
        if isinstance(other, Encrypted):
            self._same(other)
            return Encrypted([a - b for a, b in zip(self.parts, other.parts)], self.context, self.sizes,
                             self.replicated and other.replicated, self.carries + other.carries,
                             clean=self.clean and other.clean)
        return Encrypted([a - b for a, b in zip(self.parts, self._plain_parts(other))], self.context, self.sizes,
                         self.replicated, self.carries + _count(other), clean=self.clean)

    def rsub(self, other: Any) -> "Encrypted":
        return self.neg().add(other)

    def mul(self, other: Any) -> "Encrypted":
        if isinstance(other, Encrypted):  # (each such product spends a level of the context)
            self._same(other)
            return Encrypted([a * b for a, b in zip(self.parts, other.parts)], self.context, self.sizes,
                             self.replicated and other.replicated, self.carries + other.carries,
                             clean=self.clean or other.clean)  # (zero times anything)
        return Encrypted([a * b for a, b in zip(self.parts, self._plain_parts(other))], self.context, self.sizes,
                         self.replicated, self.carries + _count(other), clean=True)  # (padded with zeros)

    def neg(self) -> "Encrypted":
        return Encrypted([-a for a in self.parts], self.context, self.sizes, self.replicated, self.carries,
                         clean=self.clean)

    def sum(self) -> "Encrypted":
        """The total, in every slot: a rotation sum over all slots, of a vector whose padding holds
        zeros (masked first if it may not: one level), so never a partial sum of the owner's."""
        if self.replicated:  # one number per part already, in every slot
            total = self.parts[0]
            for p in self.parts[1:]:
                total = total + p
            return Encrypted([total], self.context, [1], True, self.carries, clean=True)
        parts = self.parts if self.clean else [p * ([1.0] * n + [0.0] * (self.context.slots - n))
                                                for p, n in zip(self.parts, self.sizes)]
        total = None
        for p in parts:
            s = self.context.widen(p.sum())
            total = s if total is None else total + s
        return Encrypted([total], self.context, [1], True, self.carries, clean=True)

    def dot(self, other: Any) -> "Encrypted":
        return self.mm(_plain_matrix(other, column=True))

    def mm(self, matrix: Any) -> "Encrypted":
        """x @ W for a plain W of shape (len(x), k): k encrypted outputs, one `dot` each."""
        w = _plain_matrix(matrix)
        if len(self.parts) != 1:
            raise NotAllowed("a matrix product takes one encrypted vector (one part)")
        if w.shape[0] != self.size:
            raise NotAllowed(f"x @ W: x has {self.size} numbers, W has {w.shape[0]} rows")
        if w.shape[1] > MAX_OUTPUTS:
            raise NotAllowed(f"at most {MAX_OUTPUTS} outputs")
        x, pad = self.parts[0], [0.0] * (self.context.slots - self.size)
        _spend(w.shape[1], self.context)  # before the work
        outs = [self.context.widen(x.dot(w[:, j].tolist() + pad)) for j in range(w.shape[1])]
        return Encrypted(outs, self.context, [1] * len(outs), True, self.carries + int(w.size), clean=True, spent=True)

    def polyval(self, coefficients: Sequence[float]) -> "Encrypted":
        coeffs = [float(c) for c in coefficients]
        if not 1 <= len(coeffs) <= 9:
            raise NotAllowed("a polynomial of degree 0 to 8")
        return Encrypted([p.polyval(coeffs) for p in self.parts], self.context, self.sizes, self.replicated,
                         self.carries + len(coeffs), clean=self.clean and coeffs[0] == 0.0)


def _spend(parts: int, context: "HEContext") -> None:
    """Count vectors made by the current action: a model the scientist sent (an fx graph of up to
    20,000 nodes) could otherwise ask for days of work and terabytes, all before its result is stored."""
    budget = getattr(_action, "budget", None)
    if budget is None:
        return
    budget[0] += parts
    if budget[0] > MAX_PARTS_PER_ACTION:
        raise NotAllowed(f"an action on encrypted data may make at most {MAX_PARTS_PER_ACTION} CKKS vectors")
    if budget[1] is not None:
        budget[1](budget[0] * context.part_bytes)  # everything it made so far counts against the memory budget


def _count(value: Any) -> int:
    """How many plain numbers an operand holds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    return len(_plain_vector(value))


def _plain_vector(value: Any) -> List[float]:
    if isinstance(value, torch.Tensor):
        value = value.detach().to(torch.float64).reshape(-1).numpy()
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise NotAllowed("plain operands must be finite")
    return arr.tolist()


def _plain_matrix(value: Any, column: bool = False) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to(torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if column:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or not np.all(np.isfinite(arr)):
        raise NotAllowed("a plain matrix of finite numbers")
    return arr


# -- models on ciphertext --------------------------------------------------------------------
def evaluate(model: torch.nn.Module, x: Encrypted) -> Encrypted:
    """A model of Linear layers and polynomial activations, on one encrypted input vector."""
    from ..he import Polynomial, Square

    if isinstance(model, torch.fx.GraphModule):
        return _interpret(model, x)
    layers = list(model) if isinstance(model, torch.nn.Sequential) else [model]
    out = x
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            out = _linear(out, layer.weight.detach().to(torch.float64).numpy(),
                          None if layer.bias is None else layer.bias.detach().to(torch.float64).numpy())
        elif isinstance(layer, Square):
            out = out.polyval([0.0, 0.0, 1.0])
        elif isinstance(layer, Polynomial):
            out = out.polyval(list(layer.coefficients))
        elif isinstance(layer, (torch.nn.Flatten, torch.nn.Identity)):
            continue
        else:
            raise NotAllowed(f"{type(layer).__name__} cannot run on encrypted data: use Linear layers and "
                             "duet.he.Square / duet.he.Polynomial activations")
    return out


def _interpret(gm: torch.fx.GraphModule, x: Encrypted) -> Encrypted:
    """A model the scientist sent (a validated fx graph, duet.owner.models), node by node on
    ciphertext: Linear submodules, x * x or x ** 2 (a square), and plain +, -, * with constants."""
    env: Dict[str, Any] = {}
    modules = dict(gm.named_modules())
    placeholders = 0

    def arg(a: Any) -> Any:
        return env[a.name] if isinstance(a, torch.fx.Node) else a

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise NotAllowed("a model on encrypted data takes one input")
            env[node.name] = x
        elif node.op == "output":
            out = arg(node.args[0])
            if not isinstance(out, Encrypted):
                raise NotAllowed("the model's output must be the encrypted result")
            return out
        elif node.op == "call_module":
            mod = modules.get(str(node.target))
            if len(node.args) != 1 or node.kwargs:
                raise NotAllowed("a submodule on encrypted data takes one input")
            env[node.name] = evaluate(mod, arg(node.args[0])) if mod is not None else None
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            a = [arg(v) for v in node.args]
            if node.kwargs or not a or not isinstance(a[0], Encrypted) and not (len(a) == 2 and isinstance(a[1], Encrypted)):
                raise NotAllowed(f"{name} cannot run on encrypted data")
            if name in ("mul", "__mul__") and len(a) == 2 and a[0] is a[1]:
                env[node.name] = a[0].polyval([0.0, 0.0, 1.0])  # x * x
            elif name in ("pow", "__pow__") and len(a) == 2 and a[1] == 2:
                env[node.name] = a[0].polyval([0.0, 0.0, 1.0])
            elif name in ("add", "__add__", "sub", "__sub__", "mul", "__mul__") and len(a) == 2:
                op = {"add": "operator.add", "sub": "operator.sub", "mul": "operator.mul"}[name.strip("_")]
                env[node.name] = _OPERATORS[op](*a)
            elif name in ("flatten", "view", "reshape") and isinstance(a[0], Encrypted):
                env[node.name] = a[0]  # an encrypted vector is flat already
            else:
                raise NotAllowed(f"{name} cannot run on encrypted data")
        elif node.op == "get_attr":
            raise NotAllowed("a model on encrypted data reads weights through its Linear layers only")
    raise NotAllowed("a model without an output")


def _linear(x: Encrypted, weight: np.ndarray, bias: Optional[np.ndarray]) -> Encrypted:
    """W x + b: by `dot`s from one CKKS vector, or by scalar products from one-number parts (the
    outputs of an earlier Linear layer; one more multiplicative level, so a context with more)."""
    if weight.shape[1] != x.size:
        raise NotAllowed(f"a Linear layer of {weight.shape[1]} inputs on {x.size} encrypted numbers")
    if len(x.parts) == 1:
        out = x.mm(weight.T)
        return out.add(bias) if bias is not None else out
    if any(n != 1 for n in x.sizes) or not x.replicated:
        raise NotAllowed("a Linear layer takes one CKKS vector, or the one-number outputs of a Linear layer")
    if weight.shape[0] * weight.shape[1] > 1 << 16:
        raise NotAllowed("a Linear layer after another is limited to 65,536 weights")
    _spend(weight.shape[0], x.context)  # before the work
    outs = []
    for m in range(weight.shape[0]):  # (each part holds its number in every slot: scalars keep it so)
        acc: Any = x.parts[0] * float(weight[m, 0])
        for j in range(1, len(x.parts)):
            acc = acc + x.parts[j] * float(weight[m, j])
        outs.append(acc + float(bias[m]) if bias is not None else acc)
    return Encrypted(outs, x.context, [1] * len(outs), x.replicated,
                     x.carries + int(weight.size) + (int(bias.size) if bias is not None else 0), clean=True, spent=True)


# -- the executor's entry ----------------------------------------------------------------------
def involved(values: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether an action touches encrypted data (then `run` does it, not torch)."""
    return any(isinstance(v, (Encrypted, Ciphertext)) for v in list(values) + list(kwargs.values()))


_OPERATORS: Dict[str, Callable[..., Encrypted]] = {
    "operator.add": lambda a, b: _enc(a, b, Encrypted.add, Encrypted.add),
    "operator.sub": lambda a, b: _enc(a, b, Encrypted.sub, Encrypted.rsub),
    "operator.mul": lambda a, b: _enc(a, b, Encrypted.mul, Encrypted.mul),
    "operator.matmul": lambda a, b: _enc(a, b, Encrypted.mm, None),
    "operator.neg": lambda a: a.neg(),
    "torch.add": lambda a, b: _enc(a, b, Encrypted.add, Encrypted.add),
    "torch.sub": lambda a, b: _enc(a, b, Encrypted.sub, Encrypted.rsub),
    "torch.mul": lambda a, b: _enc(a, b, Encrypted.mul, Encrypted.mul),
    "torch.sum": lambda a: a.sum(),
    "torch.dot": lambda a, b: _enc(a, b, Encrypted.dot, Encrypted.dot),
    "torch.mm": lambda a, b: _enc(a, b, Encrypted.mm, None),
    "torch.matmul": lambda a, b: _enc(a, b, Encrypted.mm, None),
}
_METHODS: Dict[str, Callable[..., Encrypted]] = {
    "add": Encrypted.add, "sub": Encrypted.sub, "mul": Encrypted.mul, "neg": Encrypted.neg, "sum": Encrypted.sum,
    "dot": Encrypted.dot, "mm": Encrypted.mm, "matmul": Encrypted.mm, "polyval": Encrypted.polyval,
}


def _enc(a: Any, b: Any, op: Callable[..., Encrypted], reflected: Optional[Callable[..., Encrypted]]) -> Encrypted:
    if isinstance(a, Encrypted):
        return op(a, b)
    if reflected is None:
        raise NotAllowed("a plain value @ an encrypted one is not offered: use encrypted @ plain")
    return reflected(b, a)


def run(kind: str, name: str, values: List[Any], kwargs: Dict[str, Any], context: Optional[HEContext],
        room: Optional[Callable[[int], None]] = None) -> Encrypted:
    """One allowlisted action on encrypted data; NotAllowed for anything else. `room(nbytes)` raises
    if the scientist's memory budget cannot hold what the action has made so far."""
    _action.budget = [0, room]
    try:
        return _run(kind, name, values, kwargs, context)
    finally:
        _action.budget = None


def _run(kind: str, name: str, values: List[Any], kwargs: Dict[str, Any], context: Optional[HEContext]) -> Encrypted:
    if kwargs:
        raise NotAllowed("encrypted operations take no keyword arguments")
    values = [Encrypted.from_wire(v, context) if isinstance(v, Ciphertext) else v for v in values]
    if kind == "call":
        model, args = values[0], values[1:]
        if len(args) != 1 or not isinstance(args[0], Encrypted) or not isinstance(model, torch.nn.Module):
            raise NotAllowed("a model runs on one encrypted vector")
        with torch.no_grad():
            return evaluate(model, args[0])
    if kind == "func" and name in _OPERATORS:
        return _OPERATORS[name](*values)
    if kind == "method" and name in _METHODS and isinstance(values[0], Encrypted):
        return _METHODS[name](*values)
    raise NotAllowed(f"{name} is not among the operations on encrypted data (add, sub, mul by plain numbers, "
                     "neg, sum, dot, mm/@ with a plain matrix, polyval, a model of Linear and polynomial layers)")
