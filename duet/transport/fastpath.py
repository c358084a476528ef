"""The fast path: large messages over a direct TCP connection when the peers can reach each other.

aiortc's data channel is pure-Python SCTP (about 10 MB/s here); a TCP connection between the same
two processes moves hundreds of MB/s. After pairing, `FastPathTransport` (a wrapper around the
data-channel transport) tries, in the manner of magic-wormhole's transit:

1. Offer. Once the identity handshake has bound the data channel to both parties (the signed
   transcript), each side sends, over that channel, an ephemeral X25519 public key and hints:
   the addresses and port of a TCP socket it listens on (only 127.0.0.1 with `local_only`).
2. Keys. Both derive, from the X25519 agreement keyed into BLAKE2b with the session's transcript
   context and both public keys, one key per direction and one for the handshake.
3. Connect. Both dial every hint of the other. A connection proves itself with a challenge:
   the listener sends 16 random bytes, the dialer returns them sealed with the handshake key and
   its role, the listener answers sealed. The owner takes the first connection that completes and
   sends USE on it (sealed, the first record of its direction); the others are closed. Nothing
   unauthenticated is ever decoded, and a connection that fails any check is closed.
4. Transfer. A message of at least `threshold` bytes goes as a placeholder (REF id, size) on the
   data channel, in order with every other message, and as sealed records on TCP: each record is
   length-prefixed and sealed with AES-256-GCM (when both peers have AES instructions) or
   XChaCha20-Poly1305 under the direction's key with a counter nonce, so a replayed, reordered, altered or foreign record fails to open and closes the path.
   The receiver delivers messages in data-channel order, waiting at a placeholder for its bytes,
   and acknowledges each one (ACK id).
5. Faults. When the path fails (an error, a record that does not open, no acknowledgement in
   time), every message sent on it and not yet acknowledged is sent again on the data channel
   (FALLBACK id, bytes); the receiver takes whichever copy arrives first, so nothing is lost or
   delivered twice, and everything goes on over the data channel. Establishing the path never
   delays pairing: it runs in the background, and a path that cannot be made is simply not used.

The fast path's own messages on the data channel start with 0xC1, a byte msgpack never uses, so
they can never be mistaken for a session message.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import queue
import secrets
import socket
import struct
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import msgpack
import torch
import nacl.bindings
import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public

from ..errors import ConnectionLost, ProtocolError
from .base import Buffer, CloseHandler, MessageHandler, Parts, Transport
from .sealed import TAG, Keys, available_ciphers, choose_cipher, derive_keys, open_into, seal_into

log = logging.getLogger("duet.transport.fastpath")

SIDE = 0xC1  # msgpack never uses it: the first byte of the fast path's own data-channel messages
OFFER, REF, FALLBACK, ACK, DOWN = 1, 2, 3, 4, 5
THRESHOLD = 1 << 20  # messages from this size on take the fast path
CHUNK = 4 << 20  # bytes of message per sealed record
MAX_MESSAGE = 512 << 20  # the decoder's own limit (duet.wire.Limits.max_message_bytes)
MAX_HANDSHAKE_RECORD = 256
CONNECT_TIMEOUT = 3.0  # per hint
HANDSHAKE_TIMEOUT = 5.0
LISTEN_FOR = 30.0  # seconds the listener waits for the path to come up
MAX_HINTS = 8
MAX_PENDING_HANDSHAKES = 8
MAX_EARLY = 64  # messages that arrived (on TCP, or as FALLBACK) before their placeholders, at most
MAX_EARLY_BYTES = 1 << 30  # ... and their bytes
MAX_WAITING_BYTES = 256 << 20  # data-channel messages held behind a placeholder whose bytes have not come
ACK_GRACE = 30.0  # seconds, plus one per MB, before an unacknowledged message means a dead path
USE, DATA, BYE = 0, 1, 2
PEER_CLOSED = "the peer closed the fast path"
_GOODBYE: Any = object()  # queued after the last message when the session closes
_REC = struct.Struct(">I")
_DATA = struct.Struct(">BQQQQ")  # type, message id, total size, offset, where to align (first record)
ALIGN = 64  # bytes: the receiver places the largest part of a message at an address this aligned
_PERSON = b"duet-fastpath-v1"  # BLAKE2b personalization (16 bytes)


def fast_path_enabled(explicit: Optional[bool]) -> bool:
    """`fast_path=` if given, else not DUET_FAST_PATH=0 (default on)."""
    if explicit is not None:
        return bool(explicit)
    return os.environ.get("DUET_FAST_PATH", "1").strip().lower() not in ("0", "false", "no", "off")


# -- records ------------------------------------------------------------------------------------
def _read_exact(sock: socket.socket, n: int, into: Optional[memoryview] = None) -> Union[bytes, memoryview]:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:n], n - got)
        if k == 0:
            raise ConnectionError("the fast path closed")
        got += k
    return buf[:n] if into is not None else bytes(buf)


def _read_record(sock: socket.socket, into: Optional[memoryview] = None) -> Union[bytes, memoryview]:
    (length,) = _REC.unpack(_read_exact(sock, _REC.size))
    if not 0 < length <= MAX_HANDSHAKE_RECORD:
        raise ProtocolError("a fast-path record of a size no peer sends")
    return _read_exact(sock, length, into)


def _write_record(sock: socket.socket, payload: bytes) -> None:
    """A handshake record: length-prefixed, as it is (its contents are sealed by the caller)."""
    sock.sendall(_REC.pack(len(payload)) + payload)


def _send_sealed(sock: socket.socket, keys: Keys, counter: int, header: bytes, body: memoryview, out: memoryview) -> None:
    """One link record: length, header (authenticated, in the clear), body sealed into `out`."""
    n = seal_into(keys.send, counter, header, body, out, keys.cipher)
    sock.sendall(_REC.pack(len(header) + n) + header)
    sock.sendall(out[:n])


def _send_control(sock: socket.socket, keys: Keys, counter: int, kind: int) -> None:
    _send_sealed(sock, keys, counter, _DATA.pack(kind, 0, 0, 0, 0), memoryview(b""), memoryview(bytearray(TAG)))


def _read_sealed(sock: socket.socket, scratch: memoryview) -> Tuple[bytes, memoryview]:
    """The next link record as (header, sealed body), read into `scratch`; nothing is opened yet."""
    (length,) = _REC.unpack(_read_exact(sock, _REC.size))
    if not _DATA.size + TAG <= length <= _DATA.size + CHUNK + TAG:
        raise ProtocolError("a fast-path record of a size no peer sends")
    _read_exact(sock, length, scratch)
    return bytes(scratch[:_DATA.size]), scratch[_DATA.size:length]


def _read_control(sock: socket.socket, keys: Keys, counter: int) -> int:
    header, sealed = _read_sealed(sock, memoryview(bytearray(_DATA.size + CHUNK + TAG)))
    if len(sealed) != TAG:
        raise ProtocolError("a fast-path control record with a body")
    open_into(keys.recv, counter, header, sealed, memoryview(bytearray(0)), keys.cipher)
    return header[0]


def _message_buffer(size: int, align_at: int) -> memoryview:
    """A writable buffer for an incoming message, its byte `align_at` at an ALIGN-aligned address.

    So the message's tensor can be used where it arrived (duet.wire.decode(adopt=True)) rather
    than copied. Pages are faulted in as records arrive. Not numpy's allocator: it asks for
    transparent huge pages, which cost 4-5x more to fault in on a virtual machine that returns
    freed memory to its host (0.6-0.8 s for 256 MiB here).
    """
    raw = torch.empty(size + ALIGN, dtype=torch.uint8)
    shift = (-(raw.data_ptr() + min(align_at, size))) % ALIGN
    return memoryview(raw.numpy()).cast("B")[shift:shift + size]  # type: ignore[arg-type]  # an ndarray is a buffer


def _largest_part_at(parts: Sequence[Buffer]) -> int:
    """Where in the message its largest buffer starts (a tensor's data, usually)."""
    at, best, pos = 0, -1, 0
    for part in parts:
        n = memoryview(part).nbytes
        if n > best:
            at, best = pos, n
        pos += n
    return at


def _records(parts: Sequence[Buffer], size: int) -> Iterator[Tuple[int, List[memoryview]]]:
    """The message's buffers cut into record-sized runs of pieces: (offset, pieces), views, no copies."""
    if size == 0:
        yield 0, []
        return
    offset, room = 0, CHUNK
    pieces: List[memoryview] = []
    for part in parts:
        view = memoryview(part)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        start = 0
        while start < len(view):
            take = min(room, len(view) - start)
            pieces.append(view[start:start + take])
            start += take
            room -= take
            if room == 0:
                yield offset, pieces
                offset += CHUNK
                pieces, room = [], CHUNK
    if pieces:
        yield offset, pieces


# -- the established link ---------------------------------------------------------------------------
class Link:
    """One authenticated TCP connection: a sender and a receiver thread, sealed counter-nonce records."""

    def __init__(self, sock: socket.socket, keys: Keys, send_counter: int, recv_counter: int,
                 on_message: Callable[[int, memoryview], None], on_progress: Callable[[int, int], None],
                 on_sent: Callable[[int], None], on_fail: Callable[[str], None], peer: str) -> None:
        self.sock = sock
        self.keys = keys
        self.peer = peer
        self._send_counter = send_counter
        self._recv_counter = recv_counter
        self._on_message, self._on_progress, self._on_sent, self._on_fail = on_message, on_progress, on_sent, on_fail
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()  # (id, message), _GOODBYE or None
        self._failed = threading.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._threads = [threading.Thread(target=self._send_loop, name="duet-fastpath-send", daemon=True),
                         threading.Thread(target=self._recv_loop, name="duet-fastpath-recv", daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, msg_id: int, message: Parts) -> None:
        self._queue.put((msg_id, message))

    def say_goodbye(self) -> None:
        """Close after the messages already queued, telling the peer it is not a fault (BYE)."""
        self._queue.put(_GOODBYE)

    def close(self, reason: str = "closed") -> None:
        if not self._failed.is_set():
            self._failed.set()
            self._queue.put(None)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                self.sock.close()
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return not self._failed.is_set()

    def _fail(self, reason: str) -> None:
        if not self._failed.is_set():
            self.close(reason)
            self._on_fail(reason)

    def _send_loop(self) -> None:
        out = memoryview(bytearray(CHUNK + TAG))
        try:
            while True:
                item = self._queue.get()
                if item is None or self._failed.is_set():
                    return
                if item is _GOODBYE:
                    _send_control(self.sock, self.keys, self._send_counter, BYE)
                    self.close("said goodbye")
                    return
                msg_id, message = item
                align_at = _largest_part_at(message.parts)
                for offset, pieces in _records(message.parts, message.size):
                    # A record's body is a view of the message's own memory (joined only where a
                    # record spans buffers, e.g. msgpack headers and a tensor's first bytes).
                    body = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
                    header = _DATA.pack(DATA, msg_id, message.size, offset, align_at)
                    _send_sealed(self.sock, self.keys, self._send_counter, header, body, out)
                    self._send_counter += 1
                    self.bytes_sent += len(body)
                self._on_sent(msg_id)
        except (OSError, ConnectionError) as exc:
            self._fail(f"sending failed: {exc}")
        except Exception as exc:  # pragma: no cover - a bug; the data channel carries on
            log.exception("fast path sender failed")
            self._fail(f"sending failed: {exc!r}")

    def _recv_loop(self) -> None:
        scratch = memoryview(bytearray(_DATA.size + CHUNK + TAG))
        first = memoryview(bytearray(CHUNK))
        current: Optional[Tuple[int, memoryview, int]] = None  # id, buffer, received
        last_report = 0
        try:
            while not self._failed.is_set():
                header, sealed = _read_sealed(self.sock, scratch)
                kind, msg_id, total, offset, align_at = _DATA.unpack(header)
                size = len(sealed) - TAG
                # Only these fixed fields are read before the record opens: to know where it goes.
                if kind == BYE:
                    open_into(self.keys.recv, self._recv_counter, header, sealed, first, self.keys.cipher)
                    self._fail(PEER_CLOSED)
                    return
                if kind != DATA or total > MAX_MESSAGE:
                    raise ProtocolError("an unexpected fast-path record")
                if current is None:
                    if offset != 0 or size > total:
                        raise ProtocolError("a fast-path message that does not start at its beginning")
                    # The first record opens into scratch space: the message's buffer is allocated
                    # only for a size an authenticated record gave.
                    open_into(self.keys.recv, self._recv_counter, header, sealed, first, self.keys.cipher)
                    current = (msg_id, _message_buffer(total, align_at), 0)
                    current[1][:size] = first[:size]
                else:
                    mid, data, got = current
                    if msg_id != mid or offset != got or len(data) != total or got + size > total:
                        raise ProtocolError("fast-path records out of order")
                    open_into(self.keys.recv, self._recv_counter, header, sealed, data[got:got + size], self.keys.cipher)
                self._recv_counter += 1
                mid, data, got = current
                got += size
                self.bytes_received += size
                if total >= 8 * CHUNK and got - last_report >= total // 100:
                    last_report = got
                    self._on_progress(got, total)
                if got == total:
                    current, last_report = None, 0
                    self._on_message(mid, data)
                else:
                    current = (mid, data, got)
        except (OSError, ConnectionError) as exc:
            self._fail(f"receiving failed: {exc}")
        except ProtocolError as exc:
            self._fail(str(exc))
        except Exception as exc:  # pragma: no cover - a bug; the data channel carries on
            log.exception("fast path receiver failed")
            self._fail(f"receiving failed: {exc!r}")


# -- establishing it ---------------------------------------------------------------------------
def local_hints(local_only: bool, port: int) -> List[Tuple[str, int]]:
    """Where the other side may reach our listener: loopback only, or this computer's IPv4 addresses."""
    if local_only:
        return [("127.0.0.1", port)]
    try:
        import aioice.ice

        addresses = [a for a in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) if ":" not in a]
    except Exception:  # pragma: no cover - no interfaces readable: loopback still works on one computer
        addresses = []
    return [(a, port) for a in dict.fromkeys(addresses + ["127.0.0.1"])][:MAX_HINTS]


def _close_listener(listener: socket.socket) -> None:
    """Stop listening now: shutdown wakes a thread blocked in accept(); close alone would not."""
    try:
        listener.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        listener.close()
    except OSError:
        pass


class Establisher:
    """Listen, dial, prove, choose: the background work that makes a Link (or gives up)."""

    def __init__(self, role: str, local_only: bool, on_link: Callable[[socket.socket, int, int], None],
                 on_give_up: Callable[[str], None]) -> None:
        self.role = role
        self.peer_role = "scientist" if role == "owner" else "owner"
        self.local_only = local_only
        self._on_link = on_link
        self._on_give_up = on_give_up
        self._keys: Optional[Keys] = None
        self._keys_ready = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._candidates: List[socket.socket] = []
        self._handshakes = threading.BoundedSemaphore(MAX_PENDING_HANDSHAKES)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1" if local_only else "0.0.0.0", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.attempts = 0
        threading.Thread(target=self._accept_loop, name="duet-fastpath-listen", daemon=True).start()

    def hints(self) -> List[Tuple[str, int]]:
        return local_hints(self.local_only, self.port)

    def keys_known(self, keys: Keys, peer_hints: List[Tuple[str, int]]) -> None:
        self._keys = keys
        self._keys_ready.set()
        for host, port in peer_hints[:MAX_HINTS]:
            if self.local_only and host != "127.0.0.1":
                continue
            threading.Thread(target=self._dial, args=(host, port), name="duet-fastpath-dial", daemon=True).start()
        threading.Thread(target=self._deadline, name="duet-fastpath-deadline", daemon=True).start()

    def stop(self) -> None:
        self._done.set()
        _close_listener(self.listener)
        with self._lock:
            for s in self._candidates:
                try:
                    s.close()
                except OSError:
                    pass
            self._candidates.clear()

    def _deadline(self) -> None:
        if not self._done.wait(LISTEN_FOR):
            self.stop()
            self._on_give_up("no direct TCP connection could be made (a firewall or a NAT between the peers)")

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + LISTEN_FOR + 5
        while not self._done.is_set() and time.monotonic() < deadline:
            try:
                conn, _addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._handshakes.acquire(blocking=False):
                conn.close()  # too many strangers at once
                continue
            threading.Thread(target=self._as_listener, args=(conn,), name="duet-fastpath-hs", daemon=True).start()

    def _as_listener(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            if not self._keys_ready.wait(HANDSHAKE_TIMEOUT) or self._keys is None:
                raise ProtocolError("a connection before the keys were agreed")
            challenge = secrets.token_bytes(16)
            _write_record(conn, challenge)
            hello = bytes(_read_record(conn))
            plain = self._open_hs(hello)
            if plain != b"HELLO" + self.peer_role.encode() + challenge:
                raise ProtocolError("a fast-path hello that does not answer the challenge")
            _write_record(conn, self._seal_hs(b"READY" + self.role.encode() + challenge))
            self._candidate(conn)
        except Exception as exc:
            log.info("refused a fast-path connection: %s", exc)
            conn.close()
        finally:
            self._handshakes.release()

    def _dial(self, host: str, port: int) -> None:
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            log.debug("fast path: dialing %s:%s failed: %s", host, port, exc)
            return
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            challenge = bytes(_read_record(sock))
            if len(challenge) != 16:
                raise ProtocolError("a malformed fast-path challenge")
            _write_record(sock, self._seal_hs(b"HELLO" + self.role.encode() + challenge))
            ready = self._open_hs(bytes(_read_record(sock)))
            if ready != b"READY" + self.peer_role.encode() + challenge:
                raise ProtocolError("a fast-path answer that does not match")
            self._candidate(sock)
        except Exception as exc:
            log.info("fast path: the connection to %s:%s failed its handshake: %s", host, port, exc)
            sock.close()

    def _seal_hs(self, plain: bytes) -> bytes:
        assert self._keys is not None
        nonce = secrets.token_bytes(24)
        return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, None, nonce, self._keys.handshake)

    def _open_hs(self, sealed: bytes) -> bytes:
        assert self._keys is not None
        if len(sealed) < 24 + 16:
            raise ProtocolError("a malformed fast-path handshake")
        try:
            return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed[24:], None, sealed[:24], self._keys.handshake)
        except nacl.exceptions.CryptoError:
            raise ProtocolError("a fast-path handshake sealed with another key") from None

    def _candidate(self, sock: socket.socket) -> None:
        """A proven connection. The owner uses the first and says so; the scientist waits for that word."""
        assert self._keys is not None
        sock.settimeout(None)
        if self.role == "owner":
            with self._lock:
                if self._done.is_set():
                    sock.close()
                    return
                self._done.set()
            _send_control(sock, self._keys, 0, USE)
            self.stop_listening()
            self._on_link(sock, 1, 0)
            return
        with self._lock:
            if self._done.is_set():
                sock.close()
                return
            self._candidates.append(sock)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            if _read_control(sock, self._keys, 0) != USE:
                raise ProtocolError("the owner's first record is not USE")
        except Exception:
            with self._lock:
                if sock in self._candidates:
                    self._candidates.remove(sock)
            sock.close()
            return
        with self._lock:
            if self._done.is_set():
                sock.close()
                return
            self._done.set()
            self._candidates.remove(sock)
        sock.settimeout(None)
        self.stop()
        self._on_link(sock, 0, 1)

    def stop_listening(self) -> None:
        _close_listener(self.listener)


class _Whole:
    """A message already in one buffer, as `Parts`."""

    __slots__ = ("parts", "size")

    def __init__(self, data: bytes) -> None:
        self.parts = [data]
        self.size = len(data)

    def join(self) -> bytes:
        return bytes(self.parts[0])

    def owned(self) -> "_Whole":
        return self if type(self.parts[0]) is bytes else _Whole(bytes(self.parts[0]))


# -- the transport ---------------------------------------------------------------------------
class FastPathTransport(Transport):
    """The data-channel transport, with large messages over a direct TCP path once it is up."""

    def __init__(self, inner: Transport, role: str, local_only: bool, enabled: bool = True,
                 threshold: int = THRESHOLD) -> None:
        super().__init__()
        if role not in ("owner", "scientist"):
            raise ValueError("role is owner or scientist")
        self.inner = inner
        self.role = role
        self.local_only = local_only
        self.enabled = enabled
        self.threshold = threshold
        self._loop_ref: Any = None  # the runtime loop, from start()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: "collections.OrderedDict[int, Tuple[Parts, float]]" = collections.OrderedDict()  # sent, not acked
        self._ordered: Deque[Tuple[str, Any]] = collections.deque()  # ("msg", bytes) or ("ref", id)
        self._waiting_bytes = 0  # of the "msg" entries in _ordered
        self._broken = False  # the peer broke the rules: the session is closing, nothing more is delivered
        self._early_bytes = 0  # of the entries in _filled
        self._filled: Dict[int, Buffer] = {}
        self._delivered: Set[int] = set()
        self._secret: Optional[nacl.public.PrivateKey] = None
        self._establisher: Optional[Establisher] = None
        self._peer_offer: Optional[Tuple[bytes, List[Tuple[str, int]], Any]] = None
        self._context: Optional[bytes] = None
        self._keys: Optional[Keys] = None
        self.link: Optional[Link] = None
        self.state = "off" if not enabled else "not started"
        self.settled = threading.Event()  # set once the path is up, or known not to be (or off)
        if not enabled:
            self.settled.set()
        self.closed_reason: Optional[str] = None
        self._sent_event: Optional[asyncio.Event] = None
        self._unsent: Set[int] = set()
        inner.set_handlers(self._on_inner, self._on_inner_close)

    # -- Transport ------------------------------------------------------------------------------
    def set_handlers(self, on_message: MessageHandler, on_close: CloseHandler) -> None:
        super().set_handlers(on_message, on_close)
        self.inner.on_progress = self.report_progress

    def send(self, data: bytes) -> None:
        if len(data) < self.threshold or not self._send_fast(_Whole(data)):
            self.inner.send(data)

    def send_parts(self, message: Parts) -> None:
        if message.size < self.threshold or not self._send_fast(message):
            self.inner.send(message.join())

    def _send_fast(self, message: Parts) -> bool:
        """A placeholder in order on the data channel, the bytes on TCP; False when the path is not up."""
        link = self.link
        if link is None or not link.alive:
            return False
        # Sealed later on the link's thread, and resent from the same buffers if the path fails: the
        # caller may change its tensors once send returns, so what goes out is a copy of any that are
        # still the caller's (none for a snapshot handed over, e.g. an owner's release).
        message = message.owned()
        with self._lock:  # (with _stop_fast_path: a message is either resent by it or not sent on the path)
            link = self.link
            if link is None or not link.alive:
                return False
            msg_id = next(self._ids)
            self._pending[msg_id] = (message, time.monotonic())
            self._unsent.add(msg_id)
        self.inner.send(bytes([SIDE, REF]) + struct.pack(">QQ", msg_id, message.size))
        link.send(msg_id, message)
        return True

    async def drain(self) -> None:
        await self.inner.drain()
        while True:
            with self._lock:
                unsent = bool(self._unsent)
            link = self.link
            if not unsent or link is None or not link.alive:
                return
            event = self._sent_event = asyncio.Event()
            with self._lock:
                if not self._unsent:
                    return
            try:
                await asyncio.wait_for(event.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        link = self.link
        if link is not None:
            link.say_goodbye()
        self._stop_fast_path("the session closed", tell_peer=False, quiet=True, link_closes_itself=True)
        await self.inner.close()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    @property
    def close_reason(self) -> Optional[BaseException]:
        return getattr(self.inner, "close_reason", None)

    @property
    def route(self) -> Any:
        import dataclasses

        from .route import Route

        inner = getattr(self.inner, "route", None)
        base = inner if inner is not None else Route(kind="direct")
        return dataclasses.replace(base, fast_path=self.describe())

    def describe(self) -> str:
        link = self.link
        if link is not None and link.alive:
            return (f"up: TCP to {link.peer}, for messages of {self.threshold // (1 << 20)} MiB and more "
                    f"({'AES-256-GCM' if link.keys.cipher == 'aes256gcm' else 'XChaCha20-Poly1305'})")
        if self.state == "down" and self.closed_reason:
            return f"down ({self.closed_reason}); large messages use the data channel"
        return self.state

    def stats(self) -> dict:
        link = self.link
        return {"fast_path": self.describe(), "fast_sent": link.bytes_sent if link else 0,
                "fast_received": link.bytes_received if link else 0, "awaiting_ack": len(self._pending)}

    # -- starting ------------------------------------------------------------------------------
    def start(self, context: bytes) -> None:
        """After the identity handshake: offer a key and hints over the (now authenticated) channel."""
        if not self.enabled or self._secret is not None or self.inner.closed:
            return
        import duet.runtime as runtime

        self._loop_ref = runtime.loop()
        self._context = bytes(context)
        self._secret = nacl.public.PrivateKey.generate()
        try:
            self._establisher = Establisher(self.role, self.local_only, self._link_made, self._give_up)
        except OSError as exc:
            self.state, self.closed_reason = "down", f"cannot listen for a TCP connection: {exc}"
            self.settled.set()
            return
        self.state = "connecting"
        offer = msgpack.packb({"pk": bytes(self._secret.public_key), "hints": [list(h) for h in self._establisher.hints()],
                               "aead": available_ciphers()}, use_bin_type=True)
        self.inner.send(bytes([SIDE, OFFER]) + offer)
        if self._peer_offer is not None:
            self._peer_offered(*self._peer_offer)

    def _peer_offered(self, pk: bytes, hints: List[Tuple[str, int]], aead: Any = None) -> None:
        if self._secret is None or self._establisher is None or self._context is None or self._keys is not None:
            self._peer_offer = (pk, hints, aead)
            return
        try:
            self._keys = derive_keys(self._secret, pk, self._context, self.role, choose_cipher(available_ciphers(), aead))
        except ProtocolError as exc:
            self._give_up(str(exc))
            return
        self._establisher.keys_known(self._keys, hints)

    def _link_made(self, sock: socket.socket, send_counter: int, recv_counter: int) -> None:
        """From an establishing thread: the path is up."""
        assert self._keys is not None
        try:
            peer = "{}:{}".format(*sock.getpeername()[:2])
        except OSError:
            peer = "?"
        link = Link(sock, self._keys, send_counter, recv_counter, self._tcp_message, self._tcp_progress, self._tcp_sent,
                    self._tcp_failed, peer)
        self._call_soon(self._linked, link)

    def _linked(self, link: Link) -> None:
        if self.inner.closed:
            link.close()
            return
        self.link = link
        self.state = "up"
        self.settled.set()
        log.info("fast path up: TCP to %s", link.peer)
        self._call_soon_later(self._watchdog)

    def _give_up(self, reason: str) -> None:
        self._call_soon(self._set_down, reason)

    def _set_down(self, reason: str) -> None:
        if self.state != "up" and self.link is None:
            self.state, self.closed_reason = "down", reason
            self.settled.set()

    # -- the data channel's messages ------------------------------------------------------------
    def _on_inner(self, data: Buffer) -> None:
        if self._broken:
            return  # the session is ending: nothing more is delivered
        if len(data) >= 2 and data[0] == SIDE:
            try:
                self._side(data[1], memoryview(data)[2:])
            except (ProtocolError, ValueError, struct.error, msgpack.UnpackException) as exc:
                log.warning("a malformed fast-path message on the data channel: %s", exc)
                self._stop_fast_path(f"a malformed fast-path message: {exc}")
            return
        self._ordered.append(("msg", data))
        self._waiting_bytes += len(data)
        self._pump()
        if self._waiting_bytes > MAX_WAITING_BYTES:
            self._violation(f"more than {MAX_WAITING_BYTES >> 20} MiB of messages behind a placeholder whose bytes never came")

    def _violation(self, reason: str) -> None:
        """The peer broke the fast path's rules in a way that would hold our memory: end the session."""
        log.warning("closing the session: %s", reason)
        self._broken = True
        self._stop_fast_path(reason, tell_peer=False)
        self._ordered.clear()
        self._filled.clear()
        self._waiting_bytes = self._early_bytes = 0
        asyncio.ensure_future(self.inner.close())

    def _keep_early(self, msg_id: int, data: Buffer) -> bool:
        """Hold bytes that came before their placeholder, within bounds; False (and the session ends) beyond."""
        if len(self._filled) >= MAX_EARLY or self._early_bytes + len(data) > MAX_EARLY_BYTES:
            self._violation("too many messages ahead of their places on the data channel")
            return False
        self._filled[msg_id] = data
        self._early_bytes += len(data)
        return True

    def _side(self, kind: int, body: memoryview) -> None:
        if kind == OFFER:
            offer = msgpack.unpackb(bytes(body), raw=False)
            pk, hints = offer.get("pk"), offer.get("hints")
            if not isinstance(pk, bytes) or not isinstance(hints, list):
                raise ProtocolError("malformed fast-path offer")
            clean = [(str(h[0]), int(h[1])) for h in hints[:MAX_HINTS]
                     if isinstance(h, list) and len(h) == 2 and isinstance(h[0], str) and isinstance(h[1], int)]
            aead = offer.get("aead")
            self._peer_offered(pk, clean, [a for a in aead[:8] if isinstance(a, str)] if isinstance(aead, list) else None)
        elif kind == REF:
            msg_id, size = struct.unpack(">QQ", body)
            if size > MAX_MESSAGE:
                raise ProtocolError("a fast-path message larger than any peer sends")
            self._ordered.append(("ref", msg_id))
            self._pump()
        elif kind == FALLBACK:
            (msg_id,) = struct.unpack(">Q", body[:8])
            if msg_id not in self._delivered and msg_id not in self._filled:
                if not self._keep_early(msg_id, bytes(body[8:])):
                    return
            self._pump()
        elif kind == ACK:
            (msg_id,) = struct.unpack(">Q", body)
            with self._lock:
                self._pending.pop(msg_id, None)
                self._unsent.discard(msg_id)
        elif kind == DOWN:
            self._stop_fast_path(f"the peer stopped it ({bytes(body).decode(errors='replace')[:200]})", tell_peer=False)
        else:
            raise ProtocolError(f"unknown fast-path message {kind}")

    def _pump(self) -> None:
        """Deliver messages in data-channel order; a placeholder waits for its bytes."""
        handler = self._on_message
        while self._ordered and handler is not None:
            kind, item = self._ordered[0]
            if kind == "ref":
                data = self._filled.pop(item, None)
                if data is None:
                    return
                self._early_bytes -= len(data)
                self._delivered.add(item)
                if len(self._delivered) > 100_000:
                    self._delivered = {i for i in self._delivered if i > item - 50_000}
            else:
                data = item
                self._waiting_bytes -= len(data)
            self._ordered.popleft()
            try:
                handler(data)
            except Exception:
                log.exception("on_message handler raised")

    def _on_inner_close(self, reason: Optional[BaseException]) -> None:
        self._stop_fast_path("the data channel closed", tell_peer=False, quiet=True)
        if self._on_close is not None:
            self._on_close(reason)

    # -- the TCP link's events (its threads) --------------------------------------------------------
    def _tcp_message(self, msg_id: int, data: memoryview) -> None:
        self._call_soon(self._tcp_arrived, msg_id, data)

    def _tcp_arrived(self, msg_id: int, data: memoryview) -> None:
        if self._broken:
            return
        if msg_id not in self._delivered and msg_id not in self._filled:
            if not self._keep_early(msg_id, data):  # (the receiver's own buffer, handed over: not copied)
                return
        try:
            self.inner.send(bytes([SIDE, ACK]) + struct.pack(">Q", msg_id))
        except ConnectionLost:
            pass
        self._pump()

    def _tcp_progress(self, received: int, total: int) -> None:
        self._call_soon(self.report_progress, received, total)

    def _tcp_sent(self, msg_id: int) -> None:
        with self._lock:
            self._unsent.discard(msg_id)
        event = self._sent_event
        if event is not None:
            self._call_soon(event.set)

    def _tcp_failed(self, reason: str) -> None:
        self._call_soon(lambda: self._stop_fast_path(reason, quiet=reason == PEER_CLOSED))

    # -- faults -----------------------------------------------------------------------------------
    def _watchdog(self) -> None:
        """An unacknowledged message long past what the slowest path would take: the path is dead."""
        link = self.link
        if link is None or not link.alive or self.inner.closed:
            return
        now = time.monotonic()
        with self._lock:
            overdue = [i for i, (message, at) in self._pending.items() if now - at > ACK_GRACE + message.size / 1e6]
        if overdue:
            self._stop_fast_path(f"message {overdue[0]} was not acknowledged in time")
            return
        self._call_soon_later(self._watchdog)

    def _stop_fast_path(self, reason: str, tell_peer: bool = True, quiet: bool = False,
                        link_closes_itself: bool = False) -> None:
        """Close the path; every message sent on it and not acknowledged goes again on the data channel."""
        with self._lock:
            link, self.link = self.link, None
        if self._establisher is not None:
            self._establisher.stop()
        if link is not None and not link_closes_itself:
            link.close(reason)
        if self.state in ("up", "connecting", "not started"):
            self.state, self.closed_reason = "down", reason
            self.settled.set()
            if link is not None:
                (log.info if quiet else log.warning)("fast path down: %s; large messages go over the data channel", reason)
        if self.inner.closed:
            return
        if tell_peer:
            try:
                self.inner.send(bytes([SIDE, DOWN]) + reason.encode()[:200])
            except ConnectionLost:
                return
        with self._lock:
            resend = list(self._pending.items())
            self._pending.clear()
            self._unsent.clear()
        for msg_id, (message, _at) in resend:
            try:
                self.inner.send(b"".join([bytes([SIDE, FALLBACK]), struct.pack(">Q", msg_id), *message.parts]))
            except ConnectionLost:
                return

    # -- the loop ------------------------------------------------------------------------------------
    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = getattr(self, "_loop_ref", None)
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is shutting down
            pass

    def _call_soon_later(self, fn: Callable[[], Any], delay: float = 1.0) -> None:
        loop = getattr(self, "_loop_ref", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.call_later(delay, fn))
