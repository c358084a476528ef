"""The fast path: large messages over a direct, sealed TCP connection between the two peers.

Real sessions (launch/join over real aiortc on 127.0.0.1, the embedded signaling service): the
path comes up, carries .get() and send() both ways, and falls back to the data channel without
losing or duplicating a message when the connection is cut mid-transfer or a record is altered
on the way (a proxy that flips one byte). A stranger connecting to the port during the handshake
is refused and the real peer still gets through; after the path is up the port is closed.
Records: sealed in place, they open only as exactly the record they were (key, number, header).
"""
from __future__ import annotations

import socket
import threading
from typing import Iterator, List, Optional, Tuple

import nacl.public
import pytest
import torch

import duet
from duet.errors import ProtocolError
from duet.transport import fastpath, sealed

pytestmark = pytest.mark.slow

MIB = 2**20
SETTLE = 20.0  # seconds for the path to be up (it is up within ~0.1 s on loopback)


def seeded(mib: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(mib * MIB // 4, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def duo(request) -> Iterator[Tuple[duet.Owner, duet.Scientist]]:
    """An owner and a scientist in this process, paired over real WebRTC on loopback."""
    fast = getattr(request, "param", None)
    owner = duet.launch(name="St. Mary's", local_only=True, display=False, fast_path=fast)
    scientist = None
    try:
        owner.store.add(seeded(24), name="big", description="24 MiB of seeded noise")
        owner.requests.add_handler(action="accept", kind="release")
        scientist = duet.join(owner.code, name="Dr. Lee", local_only=True, fast_path=fast)
        yield owner, scientist
    finally:
        if scientist is not None:
            scientist.close()
        owner.close()


def transport_of(scientist: duet.Scientist) -> fastpath.FastPathTransport:
    transport = scientist.session.transport
    assert isinstance(transport, fastpath.FastPathTransport)
    return transport


def owner_transport(owner: duet.Owner) -> fastpath.FastPathTransport:
    (conn,) = owner._connections
    transport = conn.session.transport
    assert isinstance(transport, fastpath.FastPathTransport)
    return transport


def test_up_on_loopback_and_carries_both_directions(duo):
    owner, scientist = duo
    t = transport_of(scientist)
    assert t.settled.wait(SETTLE)
    assert str(scientist.connection.fast_path).startswith("up: TCP to 127.0.0.1:")
    expected = "AES-256-GCM" if sealed.AESGCM in sealed.available_ciphers() else "XChaCha20-Poly1305"
    assert expected in str(scientist.connection.fast_path)
    assert "fast path up" in str(scientist.connection)
    value = scientist.store["big"].get(timeout=60)
    assert torch.equal(value, seeded(24))
    assert t.stats()["fast_received"] >= 24 * MIB
    mine = seeded(12, seed=9)
    back = scientist.send(mine).get(timeout=60)  # scientist -> owner on the path, and back
    assert torch.equal(back, mine)
    assert owner_transport(owner).stats()["fast_received"] >= 12 * MIB
    assert t.stats()["awaiting_ack"] == 0 and owner_transport(owner).stats()["awaiting_ack"] == 0
    # A small message keeps to the data channel.
    before = t.stats()["fast_received"]
    assert (scientist.store["big"][:4] * 0).get(timeout=30).tolist() == [0.0] * 4
    assert t.stats()["fast_received"] == before


def test_a_released_tensor_is_used_where_it_arrived_and_is_writable(duo):
    _owner, scientist = duo
    assert transport_of(scientist).settled.wait(SETTLE)
    value = scientist.store["big"].get(timeout=60)
    value.add_(1)  # writable, and nothing else sees it
    again = scientist.store["big"].get(timeout=60)
    assert torch.equal(again, seeded(24)) and torch.equal(value, seeded(24) + 1)
    assert value.data_ptr() % fastpath.ALIGN == 0  # placed so that the tensor's bytes are aligned


@pytest.mark.parametrize("duo", [False], indirect=True)
def test_off_when_asked(duo):
    _owner, scientist = duo
    t = transport_of(scientist)
    assert t.settled.is_set() and t.state == "off"
    assert torch.equal(scientist.store["big"][: 1024].get(timeout=30), seeded(24)[:1024])


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("DUET_FAST_PATH", "0")
    assert not fastpath.fast_path_enabled(None)
    assert fastpath.fast_path_enabled(True)
    monkeypatch.setenv("DUET_FAST_PATH", "1")
    assert fastpath.fast_path_enabled(None) and not fastpath.fast_path_enabled(False)


def test_connection_cut_mid_transfer_falls_back_without_loss_or_duplicates(duo, monkeypatch):
    owner, scientist = duo
    t = transport_of(scientist)
    assert t.settled.wait(SETTLE)
    ours = owner_transport(owner)
    assert ours.settled.wait(SETTLE) and ours.link is not None
    owner_sock = ours.link.sock
    sent_records: List[int] = []
    real_send = fastpath._send_sealed

    def cut_after_two(sock, keys, counter, header, body, out):
        real_send(sock, keys, counter, header, body, out)
        if sock is owner_sock:
            sent_records.append(counter)
            if len(sent_records) == 2:
                sock.shutdown(socket.SHUT_RDWR)  # the connection dies with the message half sent

    monkeypatch.setattr(fastpath, "_send_sealed", cut_after_two)
    value = scientist.store["big"].get(timeout=120)
    assert torch.equal(value, seeded(24))  # all of it, through the data channel
    assert len(sent_records) == 2
    assert ours.state == "down" and ours.link is None
    assert t.settled.is_set() and t.state == "down"
    # Everything goes on over the data channel, in order, each message once.
    results = [(scientist.store["big"][i * 1000:(i + 1) * 1000] * 1).get(timeout=30) for i in range(3)]
    assert all(torch.equal(r, seeded(24)[i * 1000:(i + 1) * 1000]) for i, r in enumerate(results))
    assert torch.equal(scientist.send(seeded(4, seed=3)).get(timeout=60), seeded(4, seed=3))


class FlippingProxy:
    """Forwards one TCP connection to `target`; flips one byte of what the target sends after `at` bytes."""

    def __init__(self, target: Tuple[str, int], at: int) -> None:
        self.target, self.at = target, at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flipped = threading.Event()
        self.accepted = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        self.accepted.set()
        upstream = socket.create_connection(self.target, timeout=10)
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, self.at)

    def _pump(self, src: socket.socket, dst: socket.socket, flip_at: Optional[int]) -> None:
        seen = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if flip_at is not None and not self.flipped.is_set() and seen + len(data) > flip_at:
                    data[flip_at - seen] ^= 0x01
                    self.flipped.set()
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_a_tampered_record_closes_the_path_and_the_message_arrives_intact(monkeypatch):
    """The scientist reaches the owner only through a proxy that flips one byte 3 MiB in."""
    proxies: List[FlippingProxy] = []

    def hints(self):
        if self.role != "owner":
            return [("127.0.0.1", 9)]  # nothing listens there: the owner's dial fails
        proxy = FlippingProxy(("127.0.0.1", self.port), at=3 * MIB)
        proxies.append(proxy)
        return [("127.0.0.1", proxy.port)]

    monkeypatch.setattr(fastpath.Establisher, "hints", hints)
    owner = duet.launch(local_only=True, display=False)
    scientist = None
    try:
        owner.store.add(seeded(24), name="big")
        owner.requests.add_handler(action="accept", kind="release")
        scientist = duet.join(owner.code, local_only=True)
        t = transport_of(scientist)
        assert t.settled.wait(SETTLE) and t.state == "up"
        assert proxies and proxies[0].accepted.is_set()
        value = scientist.store["big"].get(timeout=120)
        assert proxies[0].flipped.is_set()
        assert torch.equal(value, seeded(24))
        assert t.state == "down" and "did not open" in (t.closed_reason or "")
        assert (scientist.store["big"][:3] + 0).get(timeout=30).tolist() == seeded(24)[:3].tolist()
    finally:
        if scientist is not None:
            scientist.close()
        owner.close()
        for p in proxies:
            p.close()


def test_after_the_path_is_up_the_port_is_closed(duo):
    owner, scientist = duo
    assert transport_of(scientist).settled.wait(SETTLE)
    for transport in (transport_of(scientist), owner_transport(owner)):
        est = transport._establisher
        assert est is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", est.port), timeout=2).close()


# -- establishing, without sessions ----------------------------------------------------------------
def _pair_keys(context: bytes = b"ctx") -> Tuple[sealed.Keys, sealed.Keys]:
    a, b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    return (sealed.derive_keys(a, bytes(b.public_key), context, "owner"),
            sealed.derive_keys(b, bytes(a.public_key), context, "scientist"))


def test_a_stranger_is_refused_and_the_peer_still_gets_through():
    owner_keys, scientist_keys = _pair_keys()
    made: List[Tuple[str, socket.socket]] = []
    done = threading.Event()

    def linked(role: str):
        def on_link(sock: socket.socket, _send: int, _recv: int) -> None:
            made.append((role, sock))
            if len(made) == 2:
                done.set()
        return on_link

    owner = fastpath.Establisher("owner", True, linked("owner"), lambda why: None)
    scientist = fastpath.Establisher("scientist", True, linked("scientist"), lambda why: None)
    try:
        owner.keys_known(owner_keys, [])  # the owner does not dial: the scientist must reach it
        # A stranger gets a challenge, answers it with the wrong key, and is cut off.
        stranger = socket.create_connection(("127.0.0.1", owner.port), timeout=5)
        challenge = fastpath._read_record(stranger)
        _, wrong = _pair_keys(b"another session")
        box = sealed.seal(wrong.handshake, 0, b"", b"HELLOscientist" + bytes(challenge))
        fastpath._write_record(stranger, bytes(24) + box)
        stranger.settimeout(5)
        assert stranger.recv(100) == b""  # closed, nothing said
        stranger.close()
        scientist.keys_known(scientist_keys, [("127.0.0.1", owner.port)])
        assert done.wait(10)
        assert sorted(role for role, _ in made) == ["owner", "scientist"]
    finally:
        owner.stop()
        scientist.stop()
        for _, sock in made:
            sock.close()


# -- records -------------------------------------------------------------------------------------
@pytest.mark.parametrize("binding", [True, False], ids=["in place", "public wrappers"])
def test_records_open_only_as_exactly_what_was_sealed(binding, monkeypatch):
    if not binding:
        monkeypatch.setattr(sealed, "_SODIUM", None)
    owner_keys, scientist_keys = _pair_keys()
    body = memoryview(bytes(range(256)) * 40)
    out = memoryview(bytearray(len(body) + sealed.TAG))
    header = b"header-7"
    n = sealed.seal_into(owner_keys.send, 7, header, body, out)
    assert n == len(body) + sealed.TAG
    back = memoryview(bytearray(len(body)))
    assert sealed.open_into(scientist_keys.recv, 7, header, out[:n], back) == len(body) and back == body
    tampered = bytearray(out[:n])
    tampered[100] ^= 1
    for key, counter, head, data in [(scientist_keys.recv, 8, header, out[:n]),  # replayed as another record
                                     (scientist_keys.recv, 7, b"header-8", out[:n]),  # header altered
                                     (scientist_keys.recv, 7, header, memoryview(tampered)),  # body altered
                                     (owner_keys.recv, 7, header, out[:n])]:  # the other direction's key
        target = memoryview(bytearray(len(body)))
        with pytest.raises(ProtocolError, match="did not open"):
            sealed.open_into(key, counter, head, data, target)
        assert bytes(target) == bytes(len(body))  # nothing but zeros was written


@pytest.mark.skipif(sealed.AESGCM not in sealed.available_ciphers(), reason="no AES instructions here")
def test_aes_gcm_records_open_only_as_exactly_what_was_sealed_and_only_under_aes():
    a, b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    owner_keys = sealed.derive_keys(a, bytes(b.public_key), b"ctx", "owner", sealed.AESGCM)
    scientist_keys = sealed.derive_keys(b, bytes(a.public_key), b"ctx", "scientist", sealed.AESGCM)
    xchacha_keys = sealed.derive_keys(b, bytes(a.public_key), b"ctx", "scientist")
    assert owner_keys.cipher == sealed.AESGCM and scientist_keys.recv != xchacha_keys.recv  # the choice is in the keys
    body = memoryview(bytes(range(256)) * 40)
    out = memoryview(bytearray(len(body) + sealed.TAG))
    n = sealed.seal_into(owner_keys.send, 3, b"h", body, out, sealed.AESGCM)
    back = memoryview(bytearray(len(body)))
    assert sealed.open_into(scientist_keys.recv, 3, b"h", out[:n], back, sealed.AESGCM) == len(body) and back == body
    for key, counter, cipher in [(scientist_keys.recv, 4, sealed.AESGCM), (scientist_keys.recv, 3, sealed.XCHACHA),
                                 (xchacha_keys.recv, 3, sealed.AESGCM)]:
        with pytest.raises(ProtocolError, match="did not open"):
            sealed.open_into(key, counter, b"h", out[:n], memoryview(bytearray(len(body))), cipher)


def test_the_cipher_is_aes_gcm_only_when_both_peers_offer_it():
    both = [sealed.AESGCM, sealed.XCHACHA]
    assert sealed.choose_cipher(both, both) == sealed.AESGCM
    assert sealed.choose_cipher(both, [sealed.XCHACHA]) == sealed.XCHACHA
    assert sealed.choose_cipher([sealed.XCHACHA], both) == sealed.XCHACHA
    assert sealed.choose_cipher(both, None) == sealed.XCHACHA  # a peer that says nothing: what everyone has
    with pytest.raises(ProtocolError, match="cipher"):
        sealed.derive_keys(nacl.public.PrivateKey.generate(), bytes(nacl.public.PrivateKey.generate().public_key),
                           b"ctx", "owner", "rot13")


def test_keys_are_bound_to_the_session_context():
    a, b = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    k1 = sealed.derive_keys(a, bytes(b.public_key), b"session 1", "owner")
    k2 = sealed.derive_keys(a, bytes(b.public_key), b"session 2", "owner")
    assert k1.send != k2.send and k1.recv != k1.send
    with pytest.raises(ProtocolError):
        sealed.derive_keys(a, bytes(a.public_key), b"ctx", "owner")  # our own key reflected
    with pytest.raises(ProtocolError):
        sealed.derive_keys(a, bytes(32), b"ctx", "owner")  # a degenerate point


def test_records_cut_a_message_into_views_without_copying():
    data = bytes(range(256)) * (fastpath.CHUNK // 256 + 3)
    parts = [b"head", memoryview(data), b"tail"]
    size = sum(len(p) for p in parts)
    runs = list(fastpath._records(parts, size))
    assert [off for off, _ in runs] == list(range(0, size, fastpath.CHUNK))
    assert b"".join(b"".join(bytes(p) for p in pieces) for _, pieces in runs) == b"head" + data + b"tail"
    assert any(p.obj is data for _, pieces in runs for p in pieces)  # views of the tensor's own buffer
    assert fastpath._largest_part_at(parts) == 4


# -- a hostile peer cannot make the receiver hold unbounded memory ------------------------------------
def _wrapped_pair() -> Tuple[fastpath.FastPathTransport, "object", List[bytes], threading.Event]:
    """Our FastPathTransport over one end of an in-memory pair; the other end is the 'peer', raw."""
    from duet import runtime
    from duet.transport.memory import memory_pair

    ours, peer = memory_pair()
    wrapped = fastpath.FastPathTransport(ours, "owner", local_only=True)
    got: List[bytes] = []
    closed = threading.Event()
    runtime.run(_set_handlers(wrapped, got, closed), timeout=10, what="handlers")
    peer.set_handlers(lambda data: None, lambda reason: None)
    return wrapped, peer, got, closed


async def _set_handlers(wrapped, got, closed) -> None:
    wrapped.set_handlers(lambda data: got.append(bytes(data)), lambda reason: closed.set())


def test_messages_held_behind_a_placeholder_whose_bytes_never_come_are_bounded(monkeypatch):
    monkeypatch.setattr(fastpath, "MAX_WAITING_BYTES", 64 * 1024)
    wrapped, peer, got, closed = _wrapped_pair()
    peer.send(bytes([fastpath.SIDE, fastpath.REF]) + (1).to_bytes(8, "big") + (2 * MIB).to_bytes(8, "big"))
    for _ in range(100):
        try:
            peer.send(b"\x81\xa1t\xa1x" + bytes(1024))  # held: they come after the placeholder
        except duet.ConnectionLost:  # we closed it already
            break
    assert closed.wait(10)  # the session ends rather than hold them all
    assert got == [] and wrapped.closed


@pytest.mark.parametrize("flood", ["fallback", "early"])
def test_bytes_ahead_of_their_placeholders_are_bounded(flood, monkeypatch):
    monkeypatch.setattr(fastpath, "MAX_EARLY", 4)
    wrapped, peer, got, closed = _wrapped_pair()
    from duet import runtime

    for msg_id in range(1, 10):
        if flood == "fallback":
            try:
                peer.send(bytes([fastpath.SIDE, fastpath.FALLBACK]) + msg_id.to_bytes(8, "big") + bytes(1000))
            except duet.ConnectionLost:  # we closed it already
                break
        else:  # as if they had come over TCP, never announced
            runtime.loop().call_soon_threadsafe(wrapped._tcp_arrived, msg_id, memoryview(bytearray(1000)))
    assert closed.wait(10)
    assert got == [] and len(wrapped._filled) == 0


# -- what goes out is the value at send time --------------------------------------------------------
# Large messages leave the sender's thread before their bytes are sealed: the fast path's sender
# thread seals them later, and resends them on the data channel if the path fails. A caller may
# write its tensor again as soon as send returns; what arrives is still the value it sent.
WAIT = 30.0  # bound of every wait on an event below


class HeldLink:
    """Stands in for the TCP link: keeps each message it is given and seals nothing."""

    alive = True

    def __init__(self) -> None:
        self.queued: List[Tuple[int, object]] = []

    def send(self, msg_id: int, message) -> None:
        self.queued.append((msg_id, message))

    def close(self, reason: str = "closed") -> None:
        self.alive = False


def _held_pair() -> Tuple["object", HeldLink, List[bytes], threading.Event]:
    """A Session over a FastPathTransport whose path is 'up' but holds every message; the peer raw."""
    from duet.session import Session
    from duet.transport.memory import memory_pair

    ours, peer = memory_pair()
    wrapped = fastpath.FastPathTransport(ours, "scientist", local_only=True)
    link = HeldLink()
    wrapped.link = link  # type: ignore[assignment]
    session = Session(wrapped, name="sender")
    got: List[bytes] = []
    fallback = threading.Event()

    def on_peer(data) -> None:
        got.append(bytes(data))
        if data[:2] == bytes([fastpath.SIDE, fastpath.FALLBACK]):
            fallback.set()

    peer.set_handlers(on_peer, lambda reason: None)
    return session, link, got, fallback


def _mutable_values() -> List[Tuple[str, object, object]]:
    """(label, a large value, a function that changes it in place)."""
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"a": np.arange(2**18, dtype=np.float64), "b": np.ones(2**18)})
    model = torch.nn.Linear(1024, 512)
    return [
        ("tensor", seeded(2), lambda t: t.add_(1)),
        ("bfloat16 tensor", seeded(2).to(torch.bfloat16), lambda t: t.add_(1)),
        ("ndarray", np.arange(2**18, dtype=np.float64), lambda a: a.__iadd__(1)),
        ("DataFrame", frame, lambda f: f.iloc[:, 0].to_numpy().__iadd__(1)),
        ("state dict", dict(model.state_dict()), lambda s: s["weight"].add_(1)),
    ]


def _same(a: object, b: object) -> bool:
    """The same value, bit for bit, as the wire carries it."""
    from duet import wire

    return wire.encode(a) == wire.encode(b)


@pytest.mark.parametrize("label", [v[0] for v in _mutable_values()])
def test_a_value_changed_after_send_goes_out_as_it_was_on_the_path_and_in_the_fallback(label):
    from duet import wire

    ((_, value, change),) = [v for v in _mutable_values() if v[0] == label]
    before = wire.decode(wire.encode(value))  # a copy of the value at send time
    session, link, got, fallback = _held_pair()
    session.send({"t": "put", "value": value})
    change(value)  # after send returned, before anything was sealed
    assert not _same(wire.decode(wire.encode(value)), before)  # it did change
    ((msg_id, message),) = link.queued
    assert _same(wire.decode(message.join())["value"], before)  # what the sender thread will seal
    # The path fails before the peer acknowledged it: the message goes again on the data channel.
    session.transport._stop_fast_path("cut for the test", tell_peer=False)
    assert fallback.wait(WAIT)
    (resent,) = [m for m in got if m[:2] == bytes([fastpath.SIDE, fastpath.FALLBACK])]
    assert int.from_bytes(resent[2:10], "big") == msg_id
    assert _same(wire.decode(resent[10:])["value"], before)


def test_a_snapshot_handed_over_with_its_encoding_is_sent_from_its_own_memory():
    """The owner's releases (snapshots, encoded owned=True) are not copied again on the way out."""
    import numpy as np

    from duet import wire

    snap = seeded(8)
    session, link, _got, _fallback = _held_pair()
    session.send({"t": "rep", "value": {"encoded": wire.encode_parts(snap, owned=True)}})
    ((_, message),) = link.queued
    big = max(message.parts, key=lambda p: memoryview(p).nbytes)
    assert np.frombuffer(big, dtype=np.uint8).ctypes.data == snap.data_ptr()  # the snapshot's own bytes


@pytest.fixture
def held_sender(monkeypatch):
    """Hold the fast path's message records until `release` is set; `entered` is set at the first.

    Control records (USE, BYE) pass, so the path still comes up and closes."""
    entered, release = threading.Event(), threading.Event()
    real_send = fastpath._send_sealed
    queued: List[object] = []
    real_queue = fastpath.Link.send

    def hold(sock, keys, counter, header, body, out):
        if header[0] == fastpath.DATA:
            entered.set()
            assert release.wait(WAIT), "the test never let the record go"
        real_send(sock, keys, counter, header, body, out)

    def remember(self, msg_id, message):
        queued.append(message)
        real_queue(self, msg_id, message)

    monkeypatch.setattr(fastpath, "_send_sealed", hold)
    monkeypatch.setattr(fastpath.Link, "send", remember)
    try:
        yield entered, release, queued
    finally:
        release.set()


def test_a_tensor_changed_after_send_arrives_as_it_was_sent(duo, held_sender):
    _owner, scientist = duo
    entered, release, _queued = held_sender
    assert transport_of(scientist).settled.wait(SETTLE) and transport_of(scientist).state == "up"
    mine = seeded(12, seed=9)
    pointer = scientist.send(mine)
    assert entered.wait(WAIT)  # on the fast path, its sender thread held before sealing anything
    mine.add_(1)
    release.set()
    assert torch.equal(pointer.get(timeout=60), seeded(12, seed=9))


def test_a_release_is_the_snapshot_and_is_sent_from_it_without_a_copy(duo, held_sender):
    """The owner's value changes after the release was taken and before its bytes are sealed."""
    owner, scientist = duo
    entered, release, queued = held_sender
    assert owner_transport(owner).settled.wait(SETTLE) and owner_transport(owner).state == "up"
    pointer = scientist.store["big"]
    result: List[torch.Tensor] = []
    getter = threading.Thread(target=lambda: result.append(pointer.get(timeout=60)), daemon=True)
    getter.start()
    assert entered.wait(WAIT)  # the owner's sender thread holds the release, unsealed
    (conn,) = owner._connections
    conn.objects.get(pointer._rid).value.add_(1)  # the object the release was taken from
    release.set()
    getter.join(WAIT)
    assert result and torch.equal(result[0], seeded(24))
    (message,) = queued
    big = max(message.parts, key=lambda p: memoryview(p).nbytes)
    assert isinstance(big, memoryview) and not isinstance(big.obj, bytes)  # the snapshot's memory, not a copy


@pytest.mark.parametrize("duo", [False], indirect=True)
def test_without_the_fast_path_a_message_is_joined_before_send_returns(duo):
    """The data channel takes one bytes object per message, made at send: a later change is not in it."""
    _owner, scientist = duo
    assert transport_of(scientist).state == "off"
    mine = seeded(2, seed=9)
    pointer = scientist.send(mine)
    mine.add_(1)
    assert torch.equal(pointer.get(timeout=60), seeded(2, seed=9))


def test_without_aes_instructions_the_path_uses_xchacha20_poly1305(monkeypatch):
    monkeypatch.setattr(fastpath, "available_ciphers", lambda: [sealed.XCHACHA])
    owner = duet.launch(name="St. Mary's", local_only=True, display=False)
    scientist = None
    try:
        owner.store.add(seeded(4), name="big")
        owner.requests.add_handler(action="accept", kind="release")
        scientist = duet.join(owner.code, name="Dr. Lee", local_only=True)
        assert transport_of(scientist).settled.wait(SETTLE)
        assert "XChaCha20-Poly1305" in str(scientist.connection.fast_path)
        assert torch.equal(scientist.store["big"].get(timeout=60), seeded(4))
        assert transport_of(scientist).stats()["fast_received"] >= 4 * MIB
    finally:
        if scientist is not None:
            scientist.close()
        owner.close()
