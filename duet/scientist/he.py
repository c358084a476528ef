"""The scientist's side of homomorphic encryption (CKKS, TenSEAL): the secret key stays here.

    he = scientist.he.context()          # keys made here; the owner gets the public part (~34 MiB) once
    x = scientist.send(he.encrypt(t))    # the owner sees ciphertext only
    y = scientist.store["risk-model"](x) # evaluated on ciphertext (duet.owner.he)
    he.decrypt(y.get(reason="..."))      # approval as usual: y derives from the owner's private model

Precision: CKKS is approximate. With the defaults (poly modulus 8192, coefficient moduli
60/40/40/60 bits, scale 2^40) fresh ciphertexts hold values to about 1e-7, and a 784-input
Linear layer plus a square comes back within about 1e-4 of the plain result for inputs in [0, 1]
and weights of ordinary size (`PRECISION`, checked by the tests). Two multiplicative levels: a
Linear layer (a plain product) then a square. A Linear layer then any other polynomial (TenSEAL's
polyval spends a level on the coefficients) needs three: `context(poly_modulus=16384,
coeff_bits=(60, 40, 40, 40, 60))`, a public part of about 117 MiB, as precise as the default.
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

import numpy as np
import torch

from ..ciphertext import CONTEXT, VECTOR, Ciphertext
from ..protocol import RequestKind

if TYPE_CHECKING:
    from .client import Scientist

PRECISION = 1e-4  # what a Linear layer of 784 inputs then a square keep, with the default context
DEFAULT_POLY_MODULUS = 8192
DEFAULT_COEFF_BITS = (60, 40, 40, 60)
DEFAULT_SCALE_BITS = 40


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:  # pragma: no cover - an extra
        raise ImportError("encryption needs TenSEAL: pip install 'duet-p2p[encrypted]'") from None
    return tenseal


class HEContext:
    """A CKKS context whose secret key never leaves this process; the owner has its public part."""

    def __init__(self, context: Any, digest: bytes, poly_modulus: int, coeff_bits: Sequence[int], scale_bits: int,
                 public_bytes: int) -> None:
        self._context = context
        self.digest = digest
        self.poly_modulus = poly_modulus
        self.coeff_bits = tuple(coeff_bits)
        self.scale_bits = scale_bits
        self.public_bytes = public_bytes

    @property
    def slots(self) -> int:
        """Numbers one CKKS vector holds; longer inputs are split into several."""
        return self.poly_modulus // 2

    @property
    def depth(self) -> int:
        """Multiplications (by plain numbers or a square) a ciphertext can go through."""
        return len(self.coeff_bits) - 2

    def encrypt(self, values: Any) -> Ciphertext:
        """Encrypt numbers (a tensor, array or list, flattened) for the owner to compute on."""
        ts = _tenseal()
        flat = _flat(values)
        if not flat.size:
            raise ValueError("nothing to encrypt")
        if not np.all(np.isfinite(flat)):
            raise ValueError("only finite numbers can be encrypted")
        parts, sizes = [], []
        for at in range(0, flat.size, self.slots):
            chunk = flat[at:at + self.slots].tolist()
            parts.append(ts.ckks_vector(self._context, chunk).serialize())
            sizes.append(len(chunk))
        return Ciphertext(VECTOR, self.digest, tuple(parts), tuple(sizes))

    def decrypt(self, data: Ciphertext) -> torch.Tensor:
        """The numbers (float64), from a ciphertext made for this context."""
        if not isinstance(data, Ciphertext) or data.kind != VECTOR:
            raise TypeError(f"decrypt takes encrypted numbers (a Ciphertext), not {type(data).__name__}")
        if data.context != self.digest:
            raise ValueError("this ciphertext was made for another context")
        ts = _tenseal()
        out: List[float] = []
        for raw, size in zip(data.parts, data.sizes):
            values = ts.ckks_vector_from(self._context, raw).decrypt()
            if len(values) != size:
                raise ValueError("a ciphertext holds another number of values than it says")
            out += values
        return torch.tensor(out, dtype=torch.float64)

    def __repr__(self) -> str:
        return (f"<CKKS context: poly modulus {self.poly_modulus}, scale 2^{self.scale_bits}, depth {self.depth}, "
                f"{self.slots} slots; secret key here only>")


class HE:
    """`scientist.he`: encryption whose keys stay on the scientist's side."""

    def __init__(self, client: "Scientist") -> None:
        self._client = client
        self.current: Optional[HEContext] = None

    def context(self, poly_modulus: int = DEFAULT_POLY_MODULUS, coeff_bits: Sequence[int] = DEFAULT_COEFF_BITS,
                scale_bits: int = DEFAULT_SCALE_BITS, timeout: float = 300.0, progress: bool = True) -> HEContext:
        """Make keys here and give the owner the public part (Galois and relinearization keys, no
        secret key): once per session, about 34 MiB with the defaults. Returns the context to
        encrypt and decrypt with."""
        ts = _tenseal()
        if poly_modulus not in (4096, 8192, 16384):
            raise ValueError("poly_modulus is 4096, 8192 or 16384")
        if not 20 <= scale_bits <= 60 or len(coeff_bits) < 3:
            raise ValueError("scale_bits 20-60 and at least three coefficient moduli")
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus, coeff_mod_bit_sizes=list(coeff_bits))
        ctx.global_scale = 2 ** scale_bits
        ctx.generate_galois_keys()
        public = ctx.copy()
        public.make_context_public()
        raw = public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=True)
        del public
        digest = hashlib.sha256(raw).digest()
        start = time.monotonic()
        if progress:
            print(f"sending the public encryption context to the owner ({len(raw) / 2**20:.1f} MiB)...", end="", flush=True)
        self._client.session.call({"kind": RequestKind.HE_CONTEXT, "context": Ciphertext(CONTEXT, digest, (raw,))},
                                  timeout, "sending the encryption context")
        if progress:
            print(f" done in {time.monotonic() - start:.1f} s", flush=True)
        self.current = HEContext(ctx, digest, poly_modulus, coeff_bits, scale_bits, len(raw))
        return self.current


def _flat(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to(torch.float64).cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size > (1 << 20):
        raise ValueError(f"at most {1 << 20} numbers at once")
    return arr

