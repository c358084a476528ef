"""Keys and sealed records for the fast path (duet.transport.fastpath): libsodium through PyNaCl.

Each direction has its own key; each record is sealed with an AEAD, the record's number in that
direction as the nonce and its header as associated data, so a replayed, reordered, altered or
foreign record does not open. The AEAD is AES-256-GCM when both computers have AES instructions
(libsodium offers it only then; about 4 GB/s a core here, against 1.4 for XChaCha20-Poly1305) and
XChaCha20-Poly1305 otherwise; both peers offer what they have over the authenticated channel and
the choice is bound into the keys. Counter nonces never repeat under one key (one key per
direction and pairing), so GCM's 96-bit nonces are safe here. The bulk functions seal from, and open into, caller-owned buffers
through PyNaCl's own libsodium binding (`nacl._sodium`), because the public wrappers take and
return `bytes` and so cost two extra copies of every record; where that binding is not there,
they fall back to the public functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public

from ..errors import ProtocolError

__all__ = ["Keys", "derive_keys", "seal", "open_sealed", "seal_into", "open_into", "TAG", "XCHACHA", "AESGCM",
           "available_ciphers", "choose_cipher"]

TAG = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16 bytes of authentication per record (GCM's too)
XCHACHA = "xchacha20poly1305"
AESGCM = "aes256gcm"
_PERSON = b"duet-fastpath-v1"  # BLAKE2b personalization (16 bytes)


def _load_sodium() -> Any:
    try:
        from nacl._sodium import ffi, lib  # PyNaCl's binding of libsodium
    except ImportError:  # pragma: no cover - every PyNaCl release so far has it
        return None
    needed = ("crypto_aead_xchacha20poly1305_ietf_encrypt", "crypto_aead_xchacha20poly1305_ietf_decrypt")
    return (ffi, lib) if all(hasattr(lib, n) for n in needed) else None


_SODIUM = _load_sodium()


def available_ciphers() -> list:
    """The AEADs this computer offers, best first (AES-256-GCM only with AES instructions)."""
    out = []
    if _SODIUM is not None and hasattr(_SODIUM[1], "crypto_aead_aes256gcm_is_available") \
            and _SODIUM[1].crypto_aead_aes256gcm_is_available() == 1:  # (libsodium is initialized: nacl.bindings)
        out.append(AESGCM)
    return out + [XCHACHA]


def choose_cipher(mine: list, theirs: object) -> str:
    """What both peers can use: AES-256-GCM if both offer it, else XChaCha20-Poly1305 (which all have)."""
    offered = theirs if isinstance(theirs, list) else [XCHACHA]
    return AESGCM if AESGCM in mine and AESGCM in offered else XCHACHA


@dataclass(frozen=True)
class Keys:
    send: bytes
    recv: bytes
    handshake: bytes
    cipher: str = XCHACHA  # the AEAD of the link's records (handshake records are always XChaCha20-Poly1305)


def derive_keys(secret: nacl.public.PrivateKey, peer_public: bytes, context: bytes, role: str,
                cipher: str = XCHACHA) -> Keys:
    """Per-direction keys from an X25519 agreement, bound to the session, to both public keys and
    to the AEAD chosen (peers that chose differently derive different keys and never connect)."""
    if cipher not in (XCHACHA, AESGCM):
        raise ProtocolError("an unknown fast-path cipher")
    mine = bytes(secret.public_key)
    if len(peer_public) != 32 or peer_public == mine:
        raise ProtocolError("malformed fast-path key")
    try:
        shared = nacl.bindings.crypto_scalarmult(bytes(secret), peer_public)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("a degenerate fast-path key") from None
    low, high = sorted((mine, peer_public))

    suite = b"" if cipher == XCHACHA else b"|" + cipher.encode()

    def kdf(label: bytes) -> bytes:
        return nacl.hash.blake2b(context + low + high + label + suite, digest_size=32, key=shared, person=_PERSON,
                                 encoder=nacl.encoding.RawEncoder)

    to_scientist, to_owner = kdf(b"owner->scientist"), kdf(b"scientist->owner")
    send, recv = (to_scientist, to_owner) if role == "owner" else (to_owner, to_scientist)
    return Keys(send, recv, kdf(b"handshake"), cipher)


def _nonce(counter: int, cipher: str = XCHACHA) -> bytes:
    return counter.to_bytes(24 if cipher == XCHACHA else 12, "little")


def _aead(cipher: str, decrypt: bool) -> Any:
    _ffi, lib = _SODIUM
    if cipher == AESGCM:
        return lib.crypto_aead_aes256gcm_decrypt if decrypt else lib.crypto_aead_aes256gcm_encrypt
    return lib.crypto_aead_xchacha20poly1305_ietf_decrypt if decrypt else lib.crypto_aead_xchacha20poly1305_ietf_encrypt


def seal(key: bytes, counter: int, header: bytes, body: bytes) -> bytes:
    """The ciphertext and tag of `body`, with `header` authenticated alongside."""
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, header, _nonce(counter), key)


def open_sealed(key: bytes, counter: int, header: bytes, sealed: bytes) -> bytes:
    """`body` back, or ProtocolError when the record is not exactly what the peer sealed as record `counter`."""
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(sealed), header, _nonce(counter), key)
    except nacl.exceptions.CryptoError:
        raise ProtocolError("a fast-path record did not open: replayed, reordered, altered or foreign") from None


def seal_into(key: bytes, counter: int, header: bytes, body: memoryview, out: memoryview,
              cipher: str = XCHACHA) -> int:
    """Seal `body` into `out` (at least len(body) + TAG bytes); returns the sealed length."""
    n = len(body)
    if len(out) < n + TAG:
        raise ValueError("output buffer too small")
    if _SODIUM is None:  # (then AES-256-GCM is never offered)
        sealed = seal(key, counter, header, bytes(body))
        out[:len(sealed)] = sealed
        return len(sealed)
    ffi, lib = _SODIUM
    written = ffi.new("unsigned long long *")
    src = ffi.from_buffer(body) if n else ffi.NULL
    rc = _aead(cipher, False)(ffi.from_buffer(out, require_writable=True), written, src, n,
                              header, len(header), ffi.NULL, _nonce(counter, cipher), key)
    if rc != 0:  # pragma: no cover - libsodium's encrypt does not fail
        raise ProtocolError("sealing a fast-path record failed")
    return int(written[0])


def open_into(key: bytes, counter: int, header: bytes, sealed: memoryview, out: memoryview,
              cipher: str = XCHACHA) -> int:
    """Open `sealed` into `out` (at least len(sealed) - TAG bytes); returns the body length.

    When the tag does not verify, libsodium leaves `out` holding nothing of the body (XChaCha20-
    Poly1305 checks the tag before it decrypts; its AES-256-GCM decrypts while it checks and then
    zeroes the output), so `out` never holds a body that did not open. ProtocolError then.
    """
    n = len(sealed) - TAG
    if n < 0 or len(out) < n:
        raise ProtocolError("a malformed fast-path record")
    if _SODIUM is None:
        body = open_sealed(key, counter, header, bytes(sealed))
        out[:n] = body
        return n
    ffi, lib = _SODIUM
    written = ffi.new("unsigned long long *")
    dest = ffi.from_buffer(out, require_writable=True) if len(out) else ffi.new("unsigned char[1]")
    rc = _aead(cipher, True)(dest, written, ffi.NULL, ffi.from_buffer(sealed), len(sealed),
                             header, len(header), _nonce(counter, cipher), key)
    if rc != 0:
        raise ProtocolError("a fast-path record did not open: replayed, reordered, altered or foreign")
    return int(written[0])


def sodium_binding_used() -> bool:
    """Whether records are sealed in place (PyNaCl's libsodium binding) or through the public wrappers."""
    return _SODIUM is not None

