"""Long-term Ed25519 identities, and the transcript that binds them to a session.

Why: the join code proves both peers knew the secret, but not *who* they are,
and the signaling service could still have tried to sit in the middle. After
the WebRTC data channel opens, each side proves its long-term identity over the
exact DTLS certificates of this connection:

1. Each side builds ``transcript(room_id, session_id, owner_dtls_fp,
   scientist_dtls_fp, signer_role=<own role>, signer_public_key=<own key>,
   owner_name, scientist_name)`` from the fingerprints in the local and remote
   SDP (the ones the DTLS handshake checked), signs it with
   :meth:`Identity.sign`, and sends ``(public_key, name, signature)`` over the
   data channel.
2. The other side rebuilds the same transcript with ``signer_role=<peer's
   role>`` and ``signer_public_key=<peer's key>`` and the peer's claimed name,
   then calls :func:`verify`. Any difference (role, fingerprints, names,
   session, room) makes verification fail.

A man in the middle terminates DTLS with its own certificate, so the
fingerprints the two honest sides put in their transcripts differ and neither
signature verifies. Including the signer's role and key stops a signature being
reflected back or re-attributed. The owner then shows :func:`fingerprint` of the
scientist's key, so a returning scientist is recognized by key, not by name.

Key file: ``config_dir()/identity.key``, a small text file holding the 32-byte
Ed25519 seed and the public key (a consistency check against corruption).
It is created with mode 0600 atomically: written to a temporary file, then
linked into place without overwriting (so two processes starting at once agree
on one key), falling back to ``os.replace`` where hard links are unsupported.
If an existing key file is readable by group or others, it is *fixed* to 0600
and a warning is issued (refusing would lock users out for a harmless-to-fix
mode; the warning tells them the key may have been exposed).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import stat
import warnings
from dataclasses import dataclass

import msgpack
import nacl.exceptions
import nacl.signing
import nacl.utils

from duet.errors import PairingError
from duet.pairing import ROLES, SESSION_ID_BYTES

__all__ = [
    "config_dir",
    "Identity",
    "fingerprint",
    "normalize_dtls_fingerprint",
    "transcript",
    "verify",
]

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_FILE_TAG = "duet-identity-v1"
_MAX_FILE_BYTES = 4096
_TRANSCRIPT_LABEL = "duet-transcript-v1"
_HEX64 = re.compile(r"[0-9A-F]{64}")
_HEX_PAIRS = re.compile(r"[0-9A-F]{2}(:[0-9A-F]{2}){31}")
_ROOM_ID = re.compile(r"[0-9a-f]{32}")


def config_dir() -> pathlib.Path:
    """Where Duet keeps per-user state: $DUET_CONFIG_DIR, else $XDG_CONFIG_HOME/duet, else ~/.config/duet.

    A directory this call creates gets mode 0700; an existing one is left as is
    (it may be a directory the user chose on purpose).
    """
    explicit = os.environ.get("DUET_CONFIG_DIR", "")
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if explicit:
        path = pathlib.Path(explicit).expanduser()
    elif xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        path = pathlib.Path(xdg) / "duet"
    else:
        path = pathlib.Path.home() / ".config" / "duet"
    _ensure_private_dir(path)
    return path


def _ensure_private_dir(path: pathlib.Path) -> None:
    if path.is_dir():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise PairingError(f"{path} exists but is not a directory") from None
        return
    except OSError as exc:
        raise PairingError(f"cannot create the Duet config directory {path}: {exc}") from exc
    if os.name == "posix":
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


def fingerprint(public_key: bytes) -> str:
    """A stable, readable name for a key: "SHA256:" + first 16 bytes of sha256, hex in groups of 4.

    128 bits is far beyond what anyone could grind a look-alike key for.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise PairingError(f"a public key must be {PUBLIC_KEY_BYTES} bytes")
    digest = hashlib.sha256(public_key).hexdigest()[:32]
    return "SHA256:" + ":".join(digest[i : i + 4] for i in range(0, 32, 4))


class Identity:
    """A long-term Ed25519 identity (nacl.signing), so an owner can recognize a returning scientist by key fingerprint."""

    public_key: bytes
    fingerprint: str
    path: pathlib.Path | None

    def __init__(self, signing_key: nacl.signing.SigningKey, path: pathlib.Path | None = None) -> None:
        """Prefer load_or_create() or ephemeral()."""
        self._signing_key = signing_key
        self.public_key = bytes(signing_key.verify_key)
        self.fingerprint = fingerprint(self.public_key)
        self.path = path

    def __repr__(self) -> str:
        return f"Identity({self.fingerprint})"

    @classmethod
    def ephemeral(cls) -> "Identity":
        """An in-memory identity, for tests and local pairs; nothing is written."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_create(cls, path: pathlib.Path | None = None) -> "Identity":
        """This user's identity, created on first use (default config_dir()/"identity.key")."""
        if path is None:
            path = config_dir() / "identity.key"
        else:
            path = pathlib.Path(path).expanduser()
            _ensure_private_dir(path.parent)
        for _ in range(3):
            try:
                return cls._load(path)
            except FileNotFoundError:
                pass
            identity = cls._create(path)
            if identity is not None:
                return identity
            # Another process created the file first: load theirs.
        raise PairingError(f"cannot create or load the identity key file {path}")

    @classmethod
    def _load(cls, path: pathlib.Path) -> "Identity":
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise PairingError(f"cannot open the identity key file {path}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PairingError(f"the identity key file {path} is not a regular file")
            if os.name == "posix" and st.st_mode & 0o077:
                try:
                    os.fchmod(fd, 0o600)
                except OSError as exc:
                    raise PairingError(
                        f"the identity key file {path} is accessible to other users "
                        f"(mode {stat.S_IMODE(st.st_mode):o}) and cannot be fixed: {exc}"
                    ) from exc
                warnings.warn(
                    f"the identity key file {path} was accessible to other users "
                    f"(mode {stat.S_IMODE(st.st_mode):o}); it is now 600. If others may have "
                    "read it, delete it to create a new identity.",
                    stacklevel=3,
                )
            data = os.read(fd, _MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        return cls(_parse_key_file(path, data), path)

    @classmethod
    def _create(cls, path: pathlib.Path) -> "Identity | None":
        """Write a new key atomically; None if another process created `path` meanwhile."""
        signing_key = nacl.signing.SigningKey.generate()
        identity = cls(signing_key, path)
        text = (
            "# Duet identity: your long-term Ed25519 key. Keep this file private.\n"
            f"# fingerprint {identity.fingerprint}\n"
            f"{_FILE_TAG} ed25519 {bytes(signing_key).hex()} {identity.public_key.hex()}\n"
        ).encode("ascii")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{nacl.utils.random(6).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise PairingError(f"cannot create the identity key file {path}: {exc}") from exc
        try:
            try:
                if os.name == "posix":
                    os.fchmod(fd, 0o600)
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic and never overwrites
            except FileExistsError:
                return None
            except OSError:
                os.replace(tmp, path)  # filesystems without hard links
            _fsync_dir(path.parent)
        except OSError as exc:
            raise PairingError(f"cannot create the identity key file {path}: {exc}") from exc
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return identity

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature of `message` (normally a transcript())."""
        if not isinstance(message, bytes):
            raise TypeError("message must be bytes")
        return bytes(self._signing_key.sign(message).signature)


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse_key_file(path: pathlib.Path, data: bytes) -> nacl.signing.SigningKey:
    corrupted = f"the identity key file {path} is corrupted"
    if len(data) > _MAX_FILE_BYTES:
        raise PairingError(f"{corrupted} (too large); move it away to create a new identity")
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise PairingError(f"{corrupted} (not text); move it away to create a new identity") from None
    entries = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    try:
        if len(entries) != 1:
            raise ValueError("expected exactly one key line")
        fields = entries[0]
        if len(fields) != 4 or fields[0] != _FILE_TAG or fields[1] != "ed25519":
            raise ValueError("unrecognized key line")
        seed, public = bytes.fromhex(fields[2]), bytes.fromhex(fields[3])
        if len(seed) != 32 or len(public) != PUBLIC_KEY_BYTES:
            raise ValueError("wrong key length")
        signing_key = nacl.signing.SigningKey(seed)
        if bytes(signing_key.verify_key) != public:
            raise ValueError("the private and public key do not match")
    except ValueError as exc:
        raise PairingError(f"{corrupted} ({exc}); move it away to create a new identity") from None
    return signing_key


def normalize_dtls_fingerprint(value: str) -> str:
    """Canonical SHA-256 DTLS fingerprint: "AB:CD:..." (upper case, no "sha-256 " prefix).

    Accepts the SDP form ("sha-256 ab:cd:...") and bare hex with or without colons,
    so both sides encode the same certificate identically.
    """
    if not isinstance(value, str):
        raise PairingError("a DTLS fingerprint must be text")
    parts = value.split()
    if len(parts) == 2:
        algorithm, hexpart = parts
        if algorithm.lower() != "sha-256":
            raise PairingError(f"unsupported DTLS fingerprint algorithm {algorithm!r} (need sha-256)")
    elif len(parts) == 1:
        hexpart = parts[0]
    else:
        raise PairingError(f"malformed DTLS fingerprint {value!r}")
    hexpart = hexpart.upper()
    if _HEX64.fullmatch(hexpart):
        return ":".join(hexpart[i : i + 2] for i in range(0, 64, 2))
    if _HEX_PAIRS.fullmatch(hexpart):
        return hexpart
    raise PairingError(f"malformed DTLS fingerprint {value!r} (need a sha-256 fingerprint)")


def transcript(
    room_id: str,
    session_id: bytes,
    owner_dtls_fingerprint: str,
    scientist_dtls_fingerprint: str,
    signer_role: str,
    signer_public_key: bytes,
    owner_name: str,
    scientist_name: str,
) -> bytes:
    """The bytes each side signs: an unambiguous msgpack list that binds identity to this connection.

    Fields are typed and length-delimited by msgpack, so no two different
    inputs encode to the same bytes.
    """
    if not isinstance(room_id, str) or not _ROOM_ID.fullmatch(room_id.lower()):
        raise PairingError("room_id must be 32 hex characters")
    if not isinstance(session_id, bytes) or len(session_id) != SESSION_ID_BYTES:
        raise PairingError(f"session_id must be {SESSION_ID_BYTES} bytes")
    if signer_role not in ROLES:
        raise PairingError(f"signer_role must be one of {ROLES}, not {signer_role!r}")
    if not isinstance(signer_public_key, bytes) or len(signer_public_key) != PUBLIC_KEY_BYTES:
        raise PairingError(f"signer_public_key must be {PUBLIC_KEY_BYTES} bytes")
    if not isinstance(owner_name, str) or not isinstance(scientist_name, str):
        raise PairingError("names must be text")
    fields = [
        _TRANSCRIPT_LABEL,
        room_id.lower(),
        session_id,
        normalize_dtls_fingerprint(owner_dtls_fingerprint),
        normalize_dtls_fingerprint(scientist_dtls_fingerprint),
        signer_role,
        signer_public_key,
        owner_name,
        scientist_name,
    ]
    return msgpack.packb(fields, use_bin_type=True)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise PairingError unless `signature` is `public_key`'s signature of `message`."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise PairingError("the peer's identity signature does not verify: malformed public key")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise PairingError("the peer's identity signature does not verify: malformed signature")
    if not isinstance(message, bytes):
        raise PairingError("the peer's identity signature does not verify: message must be bytes")
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as exc:
        raise PairingError(
            "the peer's identity signature does not verify: the connection may have been "
            "intercepted, or the peer is not who it claims to be"
        ) from exc


@dataclass(frozen=True)
class HandshakeContext:
    """What both sides bind their signatures to: this room, this session, these DTLS keys, these names."""

    room_id: str
    session_id: bytes
    owner_dtls: str
    scientist_dtls: str
    owner_name: str
    scientist_name: str

    def fast_path_context(self) -> bytes:
        """What the fast path's keys are bound to: this room, this session, these DTLS keys (duet.transport.fastpath)."""
        return msgpack.packb([b"duet-fast-path", self.room_id, self.session_id, self.owner_dtls, self.scientist_dtls],
                             use_bin_type=True)

    def transcript(self, signer_role: str, signer_public_key: bytes) -> bytes:
        return transcript(
            self.room_id,
            self.session_id,
            self.owner_dtls,
            self.scientist_dtls,
            signer_role,
            signer_public_key,
            self.owner_name,
            self.scientist_name,
        )
