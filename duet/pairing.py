"""Join codes, key derivation and sealed signaling messages.

The signaling service is untrusted (docs/design.md, section 6 "Security rules", rule 5). The owner
creates a :class:`JoinCode` holding a 128-bit secret and the signaling URL and
reads it to the scientist out of band (video call chat). From the secret both
sides derive two independent values with keyed BLAKE2b:

* ``room_id``: what the signaling service sees, to relay messages between the two.
  A PRF output under its own personalization, so it reveals nothing about the
  secret or the seal key.
* ``seal_key``: the PyNaCl ``SecretBox`` key that seals every signaling payload
  (SDP, roles, session id). The service can neither read nor forge nor swap them.

A :class:`Sealer` binds each sealed message to the sender's role, a random
session id and a per-direction sequence number, so a hostile relay cannot
reflect a message back to its sender, splice messages from another session, or
replay an old one.

Code text format (one line, no spaces, copy-paste friendly)::

    XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XX@https://host:port/base

The part before the first ``@`` is Crockford base32 (47 symbols, 235 bits) of

* a 10-byte commitment to the owner's long-term identity key (keyed BLAKE2b
  of the Ed25519 public key, 80 bits),
* the 16-byte secret,
* a CRC-24 (OpenPGP polynomial) over ``label || len(url) || url || commitment || secret``,
* ``len(url) % 8`` in the last 3 bits.

The commitment closes room squatting: the code is a bearer secret, so whoever
holds it could register as the owner with a hosted signaling service (after a
restart, say) and answer offers. The scientist accepts the pairing only if
the owner's key, proved by its signature over the handshake transcript,
matches the commitment; finding another key that matches takes ~2^80 work.
Codes of 31 symbols (no commitment; made by ``JoinCode.new(url)`` without a
key, as tests do) are still read, and then only the secret protects the pairing.

Why a CRC and not a truncated hash: the checksum only catches typos (the secret
is what protects the session) and a CRC gives a *guarantee*: the secret is the
tail of the CRC input and the CRC follows it directly in the code, so any error
burst of up to 24 bits there (one mistyped symbol is a 5-bit burst, a swap of
two neighbours a 10-bit one) and any single changed byte of the URL is always
detected. The length bits catch a dropped or added trailing URL character
(e.g. a trailing character turned into whitespace and stripped) for certain.
The URL bytes are checksummed exactly as written, so parsing never normalizes
them.
"""
from __future__ import annotations

import base64
import binascii
import re
import string
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret
import nacl.utils

from duet import containers
from duet.errors import PairingError

__all__ = [
    "SECRET_BYTES",
    "ROLES",
    "MAX_SEALED_CHARS",
    "JoinCode",
    "Sealer",
    "new_session_id",
    "peek_session",
]

SECRET_BYTES = 16  # >= 128 bits
COMMITMENT_BYTES = 10  # 80 bits of the owner's identity key
CHECKSUM_BYTES = 3
SESSION_ID_BYTES = 16
ROLES = ("owner", "scientist")
MAX_SEALED_CHARS = 64 * 1024  # sealed text limit, in characters (it is ASCII)
MAX_URL_CHARS = 2048
MAX_CODE_TEXT_CHARS = 4096
MAX_KIND_CHARS = 64
MAX_BODY_DEPTH = 32  # the link's default too (wire.Limits.max_depth)
URL_SCHEMES = ("http", "https", "ws", "wss")

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
_DECODE.update({"O": 0, "I": 1, "L": 1})
_CODE_BITS = (SECRET_BYTES + CHECKSUM_BYTES) * 8 + 3  # + len(url) % 8
_CODE_SYMBOLS = _CODE_BITS // 5  # a code without a commitment
assert _CODE_SYMBOLS * 5 == _CODE_BITS
_COMMITTED_BITS = _CODE_BITS + COMMITMENT_BYTES * 8
_COMMITTED_SYMBOLS = _COMMITTED_BITS // 5
assert _COMMITTED_SYMBOLS * 5 == _COMMITTED_BITS
_GROUP = 5
_CRC_LABEL = b"duet-join-v1"
_CRC_LABEL_COMMITTED = b"duet-join-v2"
_OWNER_PERSON = b"duet-owner-v1"
_ROOM_PERSON = b"duet-room-v1"
_SEAL_PERSON = b"duet-seal-v1"

# Quote pairs users wrap codes in when pasting ("...", `...`, <...>, smart quotes).
_QUOTES = {
    '"': '"', "'": "'", "`": "`", "<": ">", "(": ")", "[": "]",
    "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb",
}
_TRAILING_PUNCT = ".,;:!?"
_URL_CHARS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")


def _crc24(data: bytes) -> int:
    """CRC-24 of RFC 4880 (OpenPGP): detects every error burst of up to 24 bits."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def _checksum(secret: bytes, url_bytes: bytes, commitment: bytes | None = None) -> int:
    # The secret goes last so that, in the code text, [commitment ||] secret || crc is one CRC codeword tail.
    if commitment is None:
        return _crc24(_CRC_LABEL + len(url_bytes).to_bytes(2, "big") + url_bytes + secret)
    return _crc24(_CRC_LABEL_COMMITTED + len(url_bytes).to_bytes(2, "big") + url_bytes + commitment + secret)


def owner_commitment(public_key: bytes) -> bytes:
    """What a join code commits to: 80 bits of a keyed hash of the owner's Ed25519 public key."""
    return nacl.hash.blake2b(public_key, digest_size=COMMITMENT_BYTES, person=_OWNER_PERSON,
                             encoder=nacl.encoding.RawEncoder)


def _encode_code_part(secret: bytes, url: str, commitment: bytes | None = None) -> str:
    url_bytes = url.encode("ascii")
    n = int.from_bytes(commitment, "big") if commitment is not None else 0
    n = (n << (8 * SECRET_BYTES)) | int.from_bytes(secret, "big")
    n = (n << 24) | _checksum(secret, url_bytes, commitment)
    n = (n << 3) | (len(url_bytes) & 7)
    count = _CODE_SYMBOLS if commitment is None else _COMMITTED_SYMBOLS
    symbols = [_ALPHABET[(n >> (5 * (count - 1 - i))) & 31] for i in range(count)]
    text = "".join(symbols)
    return "-".join(text[i : i + _GROUP] for i in range(0, len(text), _GROUP))


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be a signaling base URL, or None if it can."""
    if not url:
        return "the signaling URL is empty"
    if len(url) > MAX_URL_CHARS:
        return f"the signaling URL is longer than {MAX_URL_CHARS} characters"
    bad = sorted({c for c in url if c not in _URL_CHARS})
    if bad:
        return f"the signaling URL contains characters not allowed in a URL: {''.join(bad)!r}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"the signaling URL cannot be parsed ({exc})"
    if parts.scheme.lower() not in URL_SCHEMES:
        return f"the signaling URL must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}"
    if "@" in parts.netloc:
        return "the signaling URL must not contain a user name or password"
    if not parts.hostname:
        return "the signaling URL has no host"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "the signaling URL must be a base URL without '?query' or '#fragment'"
    return None


def _strip_wrapping(text: str) -> str:
    """Remove surrounding whitespace and matched quotes ("CODE". -> CODE)."""
    text = text.strip()
    while len(text) >= 2:
        opener = text[0]
        closer = _QUOTES.get(opener)
        if closer is None:
            break
        if text.endswith(closer):
            text = text[1:-1].strip()
        elif len(text) >= 3 and text[-2] == closer and text[-1] in _TRAILING_PUNCT:
            # A sentence-ending mark after the closing quote: "CODE".
            text = text[1:-2].strip()
        else:
            break
    return text


_TYPO = "the join code has a typo"


@dataclass(frozen=True)
class JoinCode:
    """What the owner reads to the scientist: a 128-bit secret and where to meet.

    The secret is the only thing that protects the pairing, so it is hidden from
    ``repr`` (logs, tracebacks); ``str(code)`` is the text to copy-paste.
    """

    secret: bytes = field(repr=False)
    signaling_url: str
    owner: bytes | None = None  # commitment to the owner's identity key (see owner_commitment)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != SECRET_BYTES:
            raise PairingError(f"a join code secret must be {SECRET_BYTES} bytes")
        if self.owner is not None and (not isinstance(self.owner, bytes) or len(self.owner) != COMMITMENT_BYTES):
            raise PairingError(f"a join code's owner commitment must be {COMMITMENT_BYTES} bytes")
        if not isinstance(self.signaling_url, str):
            raise PairingError("the signaling URL must be text")
        problem = _url_problem(self.signaling_url)
        if problem:
            raise PairingError(f"invalid signaling URL {self.signaling_url!r}: {problem}")

    @classmethod
    def new(cls, signaling_url: str, owner_key: bytes | None = None) -> "JoinCode":
        """A fresh code with a random secret, committed to the owner's public key when given."""
        if isinstance(signaling_url, str):
            signaling_url = signaling_url.strip()
        commitment = owner_commitment(owner_key) if owner_key is not None else None
        return cls(nacl.utils.random(SECRET_BYTES), signaling_url, commitment)

    def check_owner(self, public_key: bytes) -> None:
        """Refuse an answer from anyone but the owner the code was made for (room squatting)."""
        if self.owner is None:
            return
        import hmac

        if not hmac.compare_digest(owner_commitment(public_key), self.owner):
            raise PairingError(
                "the party that answered is not the owner who made this join code (their key does not match "
                "the code); someone else may hold the code and have taken over the room. Ask the owner for a new code."
            )

    @classmethod
    def parse(cls, text: str) -> "JoinCode":
        """Read a code a user pasted. Lenient about form, strict about content.

        Accepts lower case, O for 0, I/L for 1, missing or extra dashes, spaces
        inside the code part, surrounding whitespace and quotes. Any typo that
        changes the secret or the URL raises PairingError and is never accepted.
        """
        if not isinstance(text, str):
            raise PairingError(f"a join code must be text, not {type(text).__name__}")
        if len(text) > MAX_CODE_TEXT_CHARS:
            raise PairingError("this is not a Duet join code: the text is far too long")
        text = _strip_wrapping(text)
        if not text:
            raise PairingError("the join code is empty: paste the code the data owner shared")
        code_part, sep, url = text.partition("@")
        if not sep:
            raise PairingError(
                "this is not a complete Duet join code: it needs an '@' between the code "
                "and the signaling URL, like XXXXX-XXXXX-...@https://host:port"
            )
        symbols = []
        for ch in code_part:
            if ch == "-" or ch.isspace():
                continue
            value = _DECODE.get(ch.upper())
            if value is None:
                raise PairingError(f"{_TYPO}: {ch!r} is not a valid character in its code part")
            symbols.append(value)
        if len(symbols) not in (_CODE_SYMBOLS, _COMMITTED_SYMBOLS):
            raise PairingError(
                f"{_TYPO}: its code part has {len(symbols)} characters instead of "
                f"{_COMMITTED_SYMBOLS}; copy the whole code again"
            )
        if not url:
            raise PairingError("the join code has no signaling URL after the '@'")
        bad = sorted({c for c in url if c not in _URL_CHARS})
        if bad:
            # Codes we make hold only URL characters, so anything else is corruption.
            raise PairingError(f"{_TYPO}: unexpected characters {''.join(bad)!r} in its URL part")
        if len(url) > MAX_URL_CHARS:
            raise PairingError(f"{_TYPO}: its URL part is longer than {MAX_URL_CHARS} characters")
        n = 0
        for value in symbols:
            n = (n << 5) | value
        url_bytes = url.encode("ascii")
        length_bits = n & 7
        crc = (n >> 3) & 0xFFFFFF
        secret = ((n >> 27) & ((1 << (8 * SECRET_BYTES)) - 1)).to_bytes(SECRET_BYTES, "big")
        commitment = None
        if len(symbols) == _COMMITTED_SYMBOLS:
            commitment = (n >> (27 + 8 * SECRET_BYTES)).to_bytes(COMMITMENT_BYTES, "big")
        if length_bits != len(url_bytes) & 7 or crc != _checksum(secret, url_bytes, commitment):
            hint = ""
            if url[-1] in _TRAILING_PUNCT:
                hint = f" (is the {url[-1]!r} at the end part of the sentence, not of the code?)"
            raise PairingError(
                f"{_TYPO}: its checksum does not match{hint}; copy-paste it again from the data owner"
            )
        problem = _url_problem(url)
        if problem:
            # The checksum matched, so this is what the owner shared; say so.
            raise PairingError(f"the join code's signaling URL {url!r} is not usable: {problem}")
        return cls(secret, url, commitment)

    def __str__(self) -> str:
        """The single-line text users copy-paste."""
        return f"{_encode_code_part(self.secret, self.signaling_url, self.owner)}@{self.signaling_url}"

    @property
    def room_id(self) -> str:
        """The only value the signaling service learns: 32 hex chars, a keyed BLAKE2b PRF of the secret."""
        digest = nacl.hash.blake2b(
            b"", digest_size=16, key=self.secret, person=_ROOM_PERSON, encoder=nacl.encoding.RawEncoder
        )
        return digest.hex()

    @property
    def seal_key(self) -> bytes:
        """The SecretBox key for signaling payloads; independent of room_id (separate personalization)."""
        return nacl.hash.blake2b(
            b"", digest_size=32, key=self.secret, person=_SEAL_PERSON, encoder=nacl.encoding.RawEncoder
        )


# ---------------------------------------------------------------------------
# Sealed signaling messages

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_FIELDS = frozenset({"v", "role", "sid", "seq", "kind", "body"})
_MIN_BOX = nacl.secret.SecretBox.NONCE_SIZE + nacl.secret.SecretBox.MACBYTES
_MAX_SEQ = 2**63 - 1


def new_session_id() -> bytes:
    """16 random bytes naming one pairing attempt, so messages of other attempts are refused."""
    return nacl.utils.random(SESSION_ID_BYTES)


def _check_role(role: Any, what: str) -> str:
    if role not in ROLES:
        raise PairingError(f"{what} must be one of {ROLES}, not {role!r}")
    return role


def _check_body(value: Any) -> None:
    """Only plain data in bodies: what msgpack round-trips exactly, bounded in depth."""

    def visit(value: Any, inner: Callable[[Any], None]) -> None:
        if value is None or isinstance(value, (str, bytes, bool, int, float)):
            return
        if isinstance(value, list):
            for item in value:
                inner(item)
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"map keys must be str, not {type(key).__name__}")
                inner(item)
            return
        raise ValueError(f"{type(value).__name__} is not allowed (only str/bytes/int/float/bool/None/list/dict)")

    containers.walk(value, visit, max_depth=MAX_BODY_DEPTH,
                    too_deep=lambda: ValueError(f"nested deeper than {MAX_BODY_DEPTH} levels"))


def _check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or not (0 < len(kind) <= MAX_KIND_CHARS):
        raise ValueError(f"kind must be a non-empty str of at most {MAX_KIND_CHARS} characters")


def _no_duplicate_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate map key")
    return result


def _unseal(box: nacl.secret.SecretBox, text: Any) -> dict[str, Any]:
    """Decrypt and schema-check one sealed message (no role/session/sequence checks)."""
    if not isinstance(text, str):
        raise PairingError(f"malformed signaling message: expected text, got {type(text).__name__}")
    if len(text) > MAX_SEALED_CHARS:
        raise PairingError(
            f"signaling message too large: {len(text)} characters (limit {MAX_SEALED_CHARS})"
        )
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise PairingError("malformed signaling message: not base64url text")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise PairingError("malformed signaling message: not base64url text") from exc
    if len(raw) < _MIN_BOX:
        raise PairingError("malformed signaling message: too short to be sealed")
    try:
        plain = box.decrypt(raw)
    except nacl.exceptions.CryptoError as exc:
        raise PairingError(
            "cannot decrypt the signaling message: it was tampered with, or sealed with another join code"
        ) from exc
    try:
        msg = msgpack.unpackb(
            plain,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_no_duplicate_keys,
            max_str_len=MAX_SEALED_CHARS,
            max_bin_len=MAX_SEALED_CHARS,
            max_array_len=4096,
            max_map_len=1024,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; none may escape as-is
        raise PairingError(f"malformed signaling message: undecodable payload ({type(exc).__name__})") from exc
    try:
        if not isinstance(msg, dict) or set(msg) != _FIELDS:
            raise ValueError("unexpected fields")
        if type(msg["v"]) is not int or msg["v"] != 1:
            raise ValueError(f"unsupported version {msg['v']!r}")
        if msg["role"] not in ROLES:
            raise ValueError("unknown role")
        if not isinstance(msg["sid"], bytes) or len(msg["sid"]) != SESSION_ID_BYTES:
            raise ValueError("bad session id")
        if type(msg["seq"]) is not int or not (1 <= msg["seq"] <= _MAX_SEQ):
            raise ValueError("bad sequence number")
        _check_kind(msg["kind"])
        if not isinstance(msg["body"], dict):
            raise ValueError("body must be a map")
        _check_body(msg["body"])
    except ValueError as exc:
        raise PairingError(f"malformed signaling message: {exc}") from exc
    return msg


class Sealer:
    """Seals and opens signaling payloads for one session, bound to the sender's role and the session id.

    Rejects tampering, messages from its own role (reflection), another session id,
    and replays (sequence must strictly increase per direction). State only
    advances when a message passes every check, so a rejected message changes nothing.
    """

    def __init__(self, code: JoinCode, role: str, session_id: bytes) -> None:
        """`role` is this side's role; `session_id` comes from new_session_id() (or peek_session)."""
        if not isinstance(code, JoinCode):
            raise PairingError("Sealer needs a JoinCode")
        self.role = _check_role(role, "role")
        self.peer_role = ROLES[1 - ROLES.index(role)]
        if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
            raise PairingError(f"session_id must be {SESSION_ID_BYTES} bytes")
        self.session_id = session_id
        self._box = nacl.secret.SecretBox(code.seal_key)
        self._lock = threading.Lock()
        self._sent = 0
        self._received = 0

    def seal(self, kind: str, body: dict[str, Any]) -> str:
        """Encrypt and authenticate one payload; returns base64url ASCII for a JSON field."""
        try:
            _check_kind(kind)
            if not isinstance(body, dict):
                raise ValueError("body must be a dict")
            _check_body(body)
        except ValueError as exc:
            raise PairingError(f"cannot seal signaling message: {exc}") from exc
        with self._lock:
            seq = self._sent + 1
            msg = {"v": 1, "role": self.role, "sid": self.session_id, "seq": seq, "kind": kind, "body": body}
            try:
                plain = msgpack.packb(msg, use_bin_type=True)
            except (OverflowError, ValueError, TypeError) as exc:
                raise PairingError(f"cannot seal signaling message: {exc}") from exc
            text = base64.urlsafe_b64encode(bytes(self._box.encrypt(plain))).rstrip(b"=").decode("ascii")
            if len(text) > MAX_SEALED_CHARS:
                raise PairingError(
                    f"signaling message too large to seal: {len(text)} characters (limit {MAX_SEALED_CHARS})"
                )
            self._sent = seq
        return text

    def open(self, text: str) -> tuple[str, dict[str, Any]]:
        """Verify and decrypt one payload from the peer; returns (kind, body)."""
        msg = _unseal(self._box, text)
        if msg["role"] == self.role:
            raise PairingError(
                f"signaling message rejected: it claims our own role {self.role!r} (reflected back to us)"
            )
        if msg["sid"] != self.session_id:
            raise PairingError("signaling message rejected: it belongs to another session")
        with self._lock:
            if msg["seq"] <= self._received:
                raise PairingError(
                    f"signaling message rejected: replayed or out of order "
                    f"(sequence {msg['seq']} after {self._received})"
                )
            self._received = msg["seq"]
        return msg["kind"], msg["body"]


def peek_session(code: JoinCode, text: str, sender_role: str) -> bytes:
    """The session id of a first message from `sender_role`, without consuming sequence state.

    For the owner, who learns a new scientist's session id from their first
    sealed message; it then builds a Sealer with that id and opens the message again.
    """
    _check_role(sender_role, "sender_role")
    if not isinstance(code, JoinCode):
        raise PairingError("peek_session needs a JoinCode")
    msg = _unseal(nacl.secret.SecretBox(code.seal_key), text)
    if msg["role"] != sender_role:
        raise PairingError(
            f"signaling message rejected: sent by role {msg['role']!r}, expected {sender_role!r} (reflected?)"
        )
    return msg["sid"]
