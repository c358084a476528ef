"""Join codes, sealed signaling messages and identities (duet.pairing, duet.identity)."""
from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import re
import stat
import string

import msgpack
import nacl.secret
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duet import identity as ident
from duet import pairing
from duet.errors import DuetError, PairingError
from duet.identity import Identity, fingerprint, normalize_dtls_fingerprint, transcript, verify
from duet.pairing import ROLES, JoinCode, Sealer, new_session_id, peek_session

URLS = [
    "http://127.0.0.1:41235",
    "https://example.org/base/duet",
    "ws://localhost:8888/duet/",
    "wss://[::1]:9000",
    "HTTPS://Host.Example.COM",
]
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
DECODE = {c: i for i, c in enumerate(ALPHABET)}
DECODE.update({"O": 0, "I": 1, "L": 1})

url_strategy = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "ws", "wss"]),
    st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    st.from_regex(r"(/[A-Za-z0-9._~-]{1,10}){0,3}/?", fullmatch=True),
)
code_strategy = st.builds(
    JoinCode, st.binary(min_size=16, max_size=16), url_strategy, st.one_of(st.none(), st.binary(min_size=10, max_size=10))
)


def symbol_value(ch: str) -> int | None:
    return DECODE.get(ch.upper())


# ---------------------------------------------------------------------------
# Join codes


@pytest.mark.parametrize("url", URLS)
def test_code_round_trip_and_format(url: str) -> None:
    code = JoinCode.new(url)
    text = str(code)
    assert JoinCode.parse(text) == code
    assert re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{5}-){6}[0-9A-HJKMNP-TV-Z]@\S+", text), text
    assert text.endswith("@" + url)
    assert "\n" not in text and " " not in text
    assert len(code.secret) == pairing.SECRET_BYTES >= 16


@given(code_strategy)
def test_code_round_trip_any(code: JoinCode) -> None:
    assert JoinCode.parse(str(code)) == code


def test_codes_commit_to_the_owners_key() -> None:
    """Room squatting: only the key the code was made for is accepted as the owner."""
    owner, squatter = Identity.ephemeral(), Identity.ephemeral()
    code = JoinCode.new("https://duet.example.org", owner_key=owner.public_key)
    text = str(code)
    assert re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{5}-){9}[0-9A-HJKMNP-TV-Z]{2}@\S+", text), text
    parsed = JoinCode.parse(text)
    assert parsed == code and parsed.owner == pairing.owner_commitment(owner.public_key)
    parsed.check_owner(owner.public_key)
    with pytest.raises(PairingError, match="not the owner who made this join code"):
        parsed.check_owner(squatter.public_key)
    legacy = JoinCode.parse(str(JoinCode.new("https://duet.example.org")))
    assert legacy.owner is None
    legacy.check_owner(squatter.public_key)  # no commitment: only the secret protects it (documented)


def test_new_codes_have_fresh_secrets() -> None:
    secrets = {JoinCode.new(URLS[0]).secret for _ in range(50)}
    assert len(secrets) == 50


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(code=code_strategy, data=st.data())
def test_single_substitution_never_accepted(code: JoinCode, data: st.DataObject) -> None:
    text = str(code)
    at = text.index("@")
    index = data.draw(st.integers(0, len(text) - 1).filter(lambda i: i != at), label="index")
    replacement = data.draw(
        st.one_of(
            st.sampled_from(ALPHABET + ALPHABET.lower() + "OoIiLlUu-@ \t\"'.:/"),
            st.sampled_from(string.printable),
            st.characters(),
        ),
        label="replacement",
    )
    original = text[index]
    mutated = text[:index] + replacement + text[index + 1 :]
    if index < at:  # code part: case, O/I/L and dash/space lenience keep the same secret
        if original == "-":
            equivalent = replacement == "-" or replacement.isspace()
        else:
            equivalent = symbol_value(replacement) == symbol_value(original)
    else:
        equivalent = replacement == original
    try:
        parsed = JoinCode.parse(mutated)
    except PairingError as exc:
        assert not equivalent, f"an equivalent edit was refused: {mutated!r}: {exc}"
        assert "typo" in str(exc), str(exc)
    else:
        assert equivalent, f"typo accepted: {mutated!r}"
        assert parsed == code  # never a different secret or URL


@pytest.mark.parametrize("owner", [None, bytes(range(200, 210))])
@pytest.mark.parametrize("url", URLS)
def test_every_single_symbol_and_url_substitution_is_rejected(url: str, owner: bytes | None) -> None:
    """Exhaustive for one code: the CRC guarantee, not luck."""
    code = JoinCode(bytes(range(16)), url, owner)
    text = str(code)
    at = text.index("@")
    rejected = 0
    for i, ch in enumerate(text):
        if i < at and ch != "-":
            candidates = [c for c in ALPHABET if c != ch]
        elif i > at:
            candidates = [c for c in string.printable if c != ch]
        else:
            continue
        for c in candidates:
            with pytest.raises(PairingError, match="typo"):
                JoinCode.parse(text[:i] + c + text[i + 1 :])
            rejected += 1
    assert rejected > 31 * 31


def test_adjacent_swaps_and_deletions_are_rejected() -> None:
    code = JoinCode(bytes(range(100, 116)), "https://example.org:8443/duet")
    text = str(code)
    for i in range(len(text) - 1):
        swapped = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if swapped != text and "-" not in text[i : i + 2] and "@" not in text[i : i + 2]:
            with pytest.raises(PairingError):
                JoinCode.parse(swapped)
    for i, ch in enumerate(text):
        if ch not in "-@":
            with pytest.raises(PairingError):
                JoinCode.parse(text[:i] + text[i + 1 :])


def test_crockford_lenience() -> None:
    code = JoinCode(bytes.fromhex("00" * 15 + "01"), "http://127.0.0.1:41235")
    text = str(code)
    code_part, url = text.split("@")
    assert "0" in code_part
    variants = [
        code_part.lower(),
        code_part.replace("0", "O"),
        code_part.replace("0", "o"),
        code_part.replace("-", ""),
        code_part.replace("-", "--"),
        code_part.replace("-", " "),
        "-" + code_part + "-",
    ]
    for variant in variants:
        assert JoinCode.parse(variant + "@" + url) == code, variant
    one = JoinCode(bytes.fromhex("08" * 16), "http://h")  # 0x08 bytes put 1s in the code
    one_part, one_url = str(one).split("@")
    assert "1" in one_part
    for letter in "IiLl":
        assert JoinCode.parse(one_part.replace("1", letter) + "@" + one_url) == one


@pytest.mark.parametrize(
    "wrap",
    [
        "{}",
        "  {}  ",
        "\n{}\n",
        '"{}"',
        '"{}".',
        "'{}'",
        "`{}`",
        "<{}>",
        "\u201c{}\u201d",
        ' "{}" ',
        '`"{}"`',
    ],
)
def test_quotes_and_whitespace_are_stripped(wrap: str) -> None:
    code = JoinCode.new("https://example.org/duet")
    assert JoinCode.parse(wrap.format(str(code))) == code


def test_trailing_period_without_quotes_is_a_typo_with_hint() -> None:
    code = JoinCode.new("http://127.0.0.1:41235")
    with pytest.raises(PairingError, match=r"typo.*'\.'"):
        JoinCode.parse(str(code) + ".")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ('""', "empty"),
        ("T1VBV-G84BN-ANBQH-XJD2Q-MQRVP-BSF39-6", "'@'"),
        ("T1VBV-G84BN-ANBQH-XJD2Q-MQRVP-BSF39-6@", "no signaling URL"),
        ("T1VBV-G84BN@http://127.0.0.1:41235", "typo.*10 characters"),
        ("T1VBV-G84BN-ANBQH-XJD2Q-MQRVP-BSF39-6U@http://127.0.0.1:41235", "typo.*'U'"),
        ("x" * 5000, "too long"),
    ],
)
def test_malformed_codes(text: str, message: str) -> None:
    with pytest.raises(PairingError, match=message):
        JoinCode.parse(text)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(PairingError, match="text"):
        JoinCode.parse(b"abc@http://h")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.org",
        "example.org",
        "http://",
        "http:///path",
        "http://user:pw@example.org",
        "http://example.org:99999",
        "http://example.org/?token=1",
        "http://example.org/#x",
        "http://exa mple.org",
        "http://ex\u00e4mple.org",
        "javascript:alert(1)",
    ],
)
def test_invalid_urls_are_refused(url: str) -> None:
    with pytest.raises(PairingError, match="URL"):
        JoinCode.new(url)
    # Even with a correct checksum, parse() refuses an unusable URL.
    if url and all(c in pairing._URL_CHARS for c in url) and "@" not in url:
        forged = f"{pairing._encode_code_part(bytes(16), url)}@{url}"
        with pytest.raises(PairingError, match="URL"):
            JoinCode.parse(forged)


def test_join_code_constructor_validates_secret() -> None:
    with pytest.raises(PairingError, match="16 bytes"):
        JoinCode(b"short", "http://h")
    with pytest.raises(PairingError):
        JoinCode("0" * 16, "http://h")  # type: ignore[arg-type]


def test_repr_hides_the_secret() -> None:
    code = JoinCode(bytes.fromhex("ab" * 16), "http://h")
    assert "ab" * 4 not in repr(code).lower()
    assert "\\xab" not in repr(code)
    assert str(code).split("@")[0] not in repr(code)


def test_room_id_and_seal_key() -> None:
    code = JoinCode(bytes(range(16)), "http://127.0.0.1:41235")
    again = JoinCode.parse(str(code))
    assert code.room_id == again.room_id and code.seal_key == again.seal_key
    assert re.fullmatch(r"[0-9a-f]{32}", code.room_id)
    assert isinstance(code.seal_key, bytes) and len(code.seal_key) == 32
    assert code.seal_key.hex()[:32] != code.room_id
    assert bytes.fromhex(code.room_id) not in code.seal_key
    # Pinned construction: keyed BLAKE2b with distinct personalizations.
    assert code.room_id == hashlib.blake2b(b"", digest_size=16, key=code.secret, person=b"duet-room-v1").hexdigest()
    assert code.seal_key == hashlib.blake2b(b"", digest_size=32, key=code.secret, person=b"duet-seal-v1").digest()
    other = JoinCode(bytes(range(1, 17)), "http://127.0.0.1:41235")
    assert other.room_id != code.room_id and other.seal_key != code.seal_key
    assert code.secret.hex() not in code.room_id


# ---------------------------------------------------------------------------
# Sealed signaling messages

CODE = JoinCode(bytes(range(16)), "http://127.0.0.1:41235")


def pair(code: JoinCode = CODE) -> tuple[Sealer, Sealer]:
    sid = new_session_id()
    return Sealer(code, "owner", sid), Sealer(code, "scientist", sid)


def raw_seal(obj: object, code: JoinCode = CODE) -> str:
    """Seal arbitrary plaintext bytes/objects with the right key, bypassing Sealer's checks."""
    plain = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    box = nacl.secret.SecretBox(code.seal_key)
    return base64.urlsafe_b64encode(bytes(box.encrypt(plain))).rstrip(b"=").decode()


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def valid_plain(**changes: object) -> dict:
    msg = {"v": 1, "role": "scientist", "sid": b"s" * 16, "seq": 1, "kind": "offer", "body": {"sdp": "x"}}
    msg.update(changes)
    return msg


def test_session_ids_are_random_16_bytes() -> None:
    ids = {new_session_id() for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 16 for i in ids)


def test_seal_open_round_trip_both_directions() -> None:
    owner, scientist = pair()
    body = {"sdp": "v=0\r\n", "n": 3, "f": 1.5, "ok": True, "none": None, "raw": b"\x00\xff",
            "list": [1, "a", [2, {"x": b""}]], "map": {"nested": {"deep": -7}}}
    text = scientist.seal("offer", body)
    assert text.isascii() and re.fullmatch(r"[A-Za-z0-9_-]+", text)
    assert owner.open(text) == ("offer", body)
    reply = owner.seal("answer", {"sdp": "v=0"})
    assert scientist.open(reply) == ("answer", {"sdp": "v=0"})
    assert "v=0" not in text and "sdp" not in base64.urlsafe_b64decode(text + "==").decode("latin1")


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(kind=st.text(min_size=1, max_size=64), body=st.dictionaries(st.text(max_size=8), plain_values, max_size=5))
def test_seal_open_round_trip_any_plain_body(kind: str, body: dict) -> None:
    owner, scientist = pair()
    assert owner.open(scientist.seal(kind, body)) == (kind, body)


def test_same_payload_seals_differently() -> None:
    _, scientist = pair()
    assert scientist.seal("offer", {"a": 1}) != scientist.seal("offer", {"a": 1})


def test_tampering_any_byte_is_rejected() -> None:
    owner, scientist = pair()
    text = scientist.seal("offer", {"sdp": "v=0 a=fingerprint:sha-256 AB"})
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    for i in range(len(raw)):
        for flip in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= flip
            forged = base64.urlsafe_b64encode(bytes(bad)).rstrip(b"=").decode()
            with pytest.raises(PairingError, match="cannot decrypt"):
                owner.open(forged)
    with pytest.raises(PairingError):
        owner.open(text[:-4])  # truncated
    assert owner.open(text)[0] == "offer"  # rejections did not consume state


def test_wrong_join_code_cannot_open() -> None:
    other = JoinCode(bytes(range(1, 17)), CODE.signaling_url)
    sid = new_session_id()
    text = Sealer(other, "scientist", sid).seal("offer", {})
    with pytest.raises(PairingError, match="cannot decrypt"):
        Sealer(CODE, "owner", sid).open(text)
    with pytest.raises(PairingError, match="cannot decrypt"):
        peek_session(CODE, text, "scientist")


@pytest.mark.parametrize("role", ROLES)
def test_reflection_is_rejected(role: str) -> None:
    sid = new_session_id()
    sender = Sealer(CODE, role, sid)
    same_role = Sealer(CODE, role, sid)
    with pytest.raises(PairingError, match="own role"):
        same_role.open(sender.seal("offer", {}))
    with pytest.raises(PairingError, match="own role"):
        sender.open(sender.seal("offer", {}))


def test_other_session_is_rejected() -> None:
    owner, _ = pair()
    stranger = Sealer(CODE, "scientist", new_session_id())
    with pytest.raises(PairingError, match="another session"):
        owner.open(stranger.seal("offer", {}))


def test_replay_and_reorder_are_rejected() -> None:
    owner, scientist = pair()
    m1, m2, m3 = (scientist.seal("candidate", {"i": i}) for i in range(3))
    assert owner.open(m1) == ("candidate", {"i": 0})
    with pytest.raises(PairingError, match="replayed"):
        owner.open(m1)
    assert owner.open(m3) == ("candidate", {"i": 2})  # gaps are fine, order is not
    with pytest.raises(PairingError, match="replayed or out of order"):
        owner.open(m2)
    # The other direction has its own sequence.
    assert scientist.open(owner.seal("answer", {})) == ("answer", {})


def test_replay_into_a_new_sealer_of_another_session_is_rejected() -> None:
    owner, scientist = pair()
    old = scientist.seal("offer", {})
    owner.open(old)
    new_owner = Sealer(CODE, "owner", new_session_id())
    with pytest.raises(PairingError, match="another session"):
        new_owner.open(old)


def test_peek_session() -> None:
    sid = new_session_id()
    scientist = Sealer(CODE, "scientist", sid)
    first = scientist.seal("offer", {"sdp": "x"})
    assert peek_session(CODE, first, "scientist") == sid
    assert peek_session(CODE, first, "scientist") == sid  # no state consumed
    owner = Sealer(CODE, "owner", peek_session(CODE, first, "scientist"))
    assert owner.open(first) == ("offer", {"sdp": "x"})
    with pytest.raises(PairingError, match="expected 'owner'"):
        peek_session(CODE, first, "owner")
    with pytest.raises(PairingError):
        peek_session(CODE, first, "admin")
    with pytest.raises(PairingError, match="malformed"):
        peek_session(CODE, "not base64!", "scientist")


def test_oversize_is_rejected() -> None:
    owner, scientist = pair()
    with pytest.raises(PairingError, match="too large"):
        owner.open("A" * (64 * 1024 + 1))
    with pytest.raises(PairingError, match="too large"):
        scientist.seal("offer", {"sdp": "x" * (64 * 1024)})
    big = scientist.seal("offer", {"sdp": "x" * 40_000})  # below the limit still works
    assert len(big) <= 64 * 1024
    assert owner.open(big)[1]["sdp"] == "x" * 40_000


@pytest.mark.parametrize(
    "text",
    ["", "A", "AAAA", "abc$def", "a b", "=" * 8, "AAAAA", "\u00e9" * 10],
)
def test_malformed_text_is_rejected(text: str) -> None:
    owner, _ = pair()
    with pytest.raises(PairingError, match="malformed"):
        owner.open(text)


def test_non_text_is_rejected() -> None:
    owner, _ = pair()
    with pytest.raises(PairingError, match="malformed"):
        owner.open(b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "plain",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x80\x80",  # extra data
        msgpack.packb([1, 2, 3]),
        b"\x80",  # empty map
        valid_plain(v=2),
        valid_plain(v=True),
        valid_plain(role="admin"),
        valid_plain(sid=b"short"),
        valid_plain(sid="s" * 16),
        valid_plain(seq=0),
        valid_plain(seq=-1),
        valid_plain(seq=True),
        valid_plain(seq=1.0),
        valid_plain(kind=""),
        valid_plain(kind=7),
        valid_plain(kind="k" * 65),
        valid_plain(body=[1]),
        valid_plain(body="x"),
        valid_plain(body=None),
        valid_plain(body={"a": msgpack.ExtType(1, b"x")}),
        valid_plain(body={"deep": nested(40)}),
        {**valid_plain(), "extra": 1},
        {k: v for k, v in valid_plain().items() if k != "body"},
        msgpack.packb(valid_plain())[:-3],  # truncated
    ],
)
def test_schema_violations_are_rejected(plain: object) -> None:
    owner = Sealer(CODE, "owner", b"s" * 16)
    with pytest.raises(PairingError, match="malformed"):
        owner.open(raw_seal(plain))


def test_non_str_and_duplicate_keys_are_rejected() -> None:
    owner = Sealer(CODE, "owner", b"s" * 16)
    int_keys = msgpack.packb(valid_plain(body={1: "x"}), strict_types=False)
    with pytest.raises(PairingError, match="malformed"):
        owner.open(raw_seal(int_keys))
    bytes_keys = msgpack.packb(valid_plain(body={b"k": "x"}), use_bin_type=True)
    with pytest.raises(PairingError, match="malformed"):
        owner.open(raw_seal(bytes_keys))
    # map of 7 entries with "seq" twice: a forger could hope the second wins.
    packer = msgpack.Packer(use_bin_type=True)
    dup = b"\x87" + b"".join(packer.pack(k) + packer.pack(v) for k, v in valid_plain().items())
    dup += packer.pack("seq") + packer.pack(99)
    with pytest.raises(PairingError, match="malformed"):
        owner.open(raw_seal(dup))
    # A well-formed one through the same path is accepted (the helper is sound).
    assert owner.open(raw_seal(valid_plain())) == ("offer", {"sdp": "x"})


@given(st.binary(max_size=300))
def test_random_plaintexts_never_crash(plain: bytes) -> None:
    owner = Sealer(CODE, "owner", b"s" * 16)
    try:
        kind, body = owner.open(raw_seal(plain))
    except PairingError:
        return
    assert isinstance(kind, str) and isinstance(body, dict)


@given(st.text(max_size=200))
def test_random_texts_only_raise_pairing_error(text: str) -> None:
    owner = Sealer(CODE, "owner", b"s" * 16)
    with pytest.raises(PairingError):
        owner.open(text)


@pytest.mark.parametrize(
    "kind, body",
    [
        ("offer", {"t": (1, 2)}),
        ("offer", {"s": {1, 2}}),
        ("offer", {1: "int key"}),
        ("offer", {"o": object()}),
        ("offer", {"big": 2**64}),
        ("offer", ["not", "a", "dict"]),
        ("", {}),
        (None, {}),
    ],
)
def test_seal_refuses_non_plain_data(kind: object, body: object) -> None:
    _, scientist = pair()
    with pytest.raises(PairingError, match="cannot seal"):
        scientist.seal(kind, body)  # type: ignore[arg-type]


def test_sealer_validates_arguments() -> None:
    with pytest.raises(PairingError, match="role"):
        Sealer(CODE, "admin", new_session_id())
    with pytest.raises(PairingError, match="session_id"):
        Sealer(CODE, "owner", b"short")
    with pytest.raises(PairingError):
        Sealer("code", "owner", new_session_id())  # type: ignore[arg-type]


def test_error_messages_are_distinct() -> None:
    owner, scientist = pair()
    good = scientist.seal("offer", {})
    owner.open(good)
    cases = {
        "replayed": lambda: owner.open(good),
        "own role": lambda: owner.open(owner.seal("x", {})),
        "another session": lambda: owner.open(Sealer(CODE, "scientist", new_session_id()).seal("x", {})),
        "malformed": lambda: owner.open(raw_seal(b"junk")),
        "cannot decrypt": lambda: owner.open(
            Sealer(JoinCode.new("http://h"), "scientist", owner.session_id).seal("x", {})
        ),
        "too large": lambda: owner.open("A" * 70000),
    }
    for expected, case in cases.items():
        with pytest.raises(PairingError) as info:
            case()
        matching = [pattern for pattern in cases if pattern in str(info.value)]
        assert matching == [expected], str(info.value)
    assert issubclass(PairingError, DuetError)


def test_no_pickle_in_modules() -> None:
    for module in (pairing, ident):
        source = pathlib.Path(module.__file__).read_text(encoding="utf-8")
        assert "import pickle" not in source and "eval(" not in source and "exec(" not in source


# ---------------------------------------------------------------------------
# Identity


@pytest.fixture
def config(tmp_path, monkeypatch):
    directory = tmp_path / "cfg" / "duet"
    monkeypatch.setenv("DUET_CONFIG_DIR", str(directory))
    return directory


def test_config_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DUET_CONFIG_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert ident.config_dir() == tmp_path / "home" / ".config" / "duet"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    assert ident.config_dir() == tmp_path / "home" / ".config" / "duet"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert ident.config_dir() == tmp_path / "xdg" / "duet"
    monkeypatch.setenv("DUET_CONFIG_DIR", str(tmp_path / "explicit"))
    path = ident.config_dir()
    assert path == tmp_path / "explicit"
    assert path.is_dir()
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_identity_created_private_and_reloaded(config, monkeypatch) -> None:
    old = os.umask(0o022)
    try:
        first = Identity.load_or_create()
    finally:
        os.umask(old)
    key_file = config / "identity.key"
    assert first.path == key_file and key_file.is_file()
    if os.name == "posix":
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert os.listdir(config) == ["identity.key"]  # no temporary files left behind
    again = Identity.load_or_create()
    assert again.public_key == first.public_key and again.fingerprint == first.fingerprint
    assert len(first.public_key) == 32
    message = b"hello"
    verify(first.public_key, message, again.sign(message))
    assert first.fingerprint in key_file.read_text()
    assert first.fingerprint in repr(first) and key_file.read_text().split()[-2] not in repr(first)


def test_identity_explicit_path(tmp_path) -> None:
    path = tmp_path / "sub" / "me.key"
    one = Identity.load_or_create(path)
    assert path.exists()
    assert Identity.load_or_create(path).public_key == one.public_key
    assert Identity.load_or_create(tmp_path / "other.key").public_key != one.public_key


def test_creation_race_keeps_the_first_key(tmp_path) -> None:
    path = tmp_path / "identity.key"
    winner = Identity.load_or_create(path)
    assert Identity._create(path) is None  # a second creator never overwrites
    assert Identity.load_or_create(path).public_key == winner.public_key
    assert sorted(os.listdir(tmp_path)) == ["identity.key"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\xff\xfe\x00",
        b"duet-identity-v1 ed25519 zz 00\n",
        b"duet-identity-v1 ed25519 " + b"00" * 32 + b" " + b"00" * 32 + b"\n",  # pub does not match
        b"duet-identity-v1 ed25519 " + b"00" * 31 + b"\n",
        b"x" * 5000,
    ],
)
def test_corrupted_identity_file(config, content: bytes) -> None:
    Identity.load_or_create()
    key_file = config / "identity.key"
    key_file.write_bytes(content)
    with pytest.raises(PairingError, match="corrupted") as info:
        Identity.load_or_create()
    assert str(key_file) in str(info.value)
    assert key_file.read_bytes() == content  # never silently replaced


def test_truncated_identity_file(config) -> None:
    Identity.load_or_create()
    key_file = config / "identity.key"
    key_file.write_bytes(key_file.read_bytes()[:-20])
    with pytest.raises(PairingError, match=re.escape(str(key_file))):
        Identity.load_or_create()


def test_identity_path_is_a_directory(tmp_path) -> None:
    (tmp_path / "identity.key").mkdir()
    with pytest.raises(PairingError, match="identity.key"):
        Identity.load_or_create(tmp_path / "identity.key")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_loose_permissions_are_fixed_with_a_warning(config) -> None:
    first = Identity.load_or_create()
    key_file = config / "identity.key"
    os.chmod(key_file, 0o644)
    with pytest.warns(UserWarning, match="accessible to other users"):
        again = Identity.load_or_create()
    assert again.public_key == first.public_key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_ephemeral_identities_differ_and_sign() -> None:
    a, b = Identity.ephemeral(), Identity.ephemeral()
    assert a.public_key != b.public_key and a.path is None
    sig = a.sign(b"m")
    assert len(sig) == 64
    verify(a.public_key, b"m", sig)
    with pytest.raises(PairingError, match="does not verify"):
        verify(b.public_key, b"m", sig)


def test_fingerprint_format_is_stable() -> None:
    key = bytes(range(32))
    expected_hex = hashlib.sha256(key).hexdigest()[:32]
    fp = fingerprint(key)
    assert fp == "SHA256:" + ":".join(expected_hex[i : i + 4] for i in range(0, 32, 4))
    assert re.fullmatch(r"SHA256:([0-9a-f]{4}:){7}[0-9a-f]{4}", fp)
    assert fingerprint(bytes(32)) != fp
    with pytest.raises(PairingError):
        fingerprint(b"short")


# ---------------------------------------------------------------------------
# Transcript

FP_OWNER = ":".join(f"{i:02X}" for i in range(32))
FP_SCI = ":".join(f"{255 - i:02X}" for i in range(32))


def transcript_args(**changes: object) -> dict:
    args = dict(
        room_id=CODE.room_id,
        session_id=b"s" * 16,
        owner_dtls_fingerprint=FP_OWNER,
        scientist_dtls_fingerprint=FP_SCI,
        signer_role="scientist",
        signer_public_key=b"k" * 32,
        owner_name="Olivia (hospital)",
        scientist_name="Sam",
    )
    args.update(changes)
    return args


def test_handshake_sign_and_verify_both_ways() -> None:
    owner, scientist = Identity.ephemeral(), Identity.ephemeral()
    common = dict(room_id=CODE.room_id, session_id=b"s" * 16, owner_dtls_fingerprint=FP_OWNER,
                  scientist_dtls_fingerprint=FP_SCI, owner_name="Olivia", scientist_name="Sam")
    sci_sig = scientist.sign(transcript(**common, signer_role="scientist", signer_public_key=scientist.public_key))
    owner_sig = owner.sign(transcript(**common, signer_role="owner", signer_public_key=owner.public_key))
    # Each side rebuilds the peer's transcript with the peer's role and key.
    verify(scientist.public_key, transcript(**common, signer_role="scientist",
                                            signer_public_key=scientist.public_key), sci_sig)
    verify(owner.public_key, transcript(**common, signer_role="owner", signer_public_key=owner.public_key), owner_sig)
    # A signature cannot be reflected: the owner's signature is not a scientist's.
    with pytest.raises(PairingError, match="does not verify"):
        verify(owner.public_key, transcript(**common, signer_role="scientist",
                                            signer_public_key=owner.public_key), owner_sig)


@pytest.mark.parametrize(
    "field, value",
    [
        ("room_id", JoinCode(bytes(range(1, 17)), "http://h").room_id),
        ("session_id", b"t" * 16),
        ("owner_dtls_fingerprint", FP_SCI),
        ("scientist_dtls_fingerprint", FP_OWNER),
        ("signer_role", "owner"),
        ("signer_public_key", b"j" * 32),
        ("owner_name", "Olivia (hospita1)"),
        ("scientist_name", "Sam "),
    ],
)
def test_verification_fails_if_any_field_differs(field: str, value: object) -> None:
    signer = Identity.ephemeral()
    args = transcript_args(signer_public_key=signer.public_key)
    signature = signer.sign(transcript(**args))
    verify(signer.public_key, transcript(**args), signature)
    changed = {**args, field: value}
    if field == "signer_public_key":
        changed[field] = Identity.ephemeral().public_key
    assert transcript(**changed) != transcript(**args)
    with pytest.raises(PairingError, match="does not verify"):
        verify(signer.public_key, transcript(**changed), signature)


def test_swapped_names_or_fingerprints_change_the_transcript() -> None:
    base = transcript(**transcript_args())
    assert transcript(**transcript_args(owner_name="Sam", scientist_name="Olivia (hospital)")) != base
    assert transcript(**transcript_args(owner_dtls_fingerprint=FP_SCI, scientist_dtls_fingerprint=FP_OWNER)) != base
    # Field boundaries are unambiguous: moving characters between names changes the bytes.
    assert transcript(**transcript_args(owner_name="ab", scientist_name="c")) != transcript(
        **transcript_args(owner_name="a", scientist_name="bc")
    )
    decoded = msgpack.unpackb(base)
    assert decoded[0] == "duet-transcript-v1" and len(decoded) == 9


def test_dtls_fingerprints_are_normalized() -> None:
    forms = [FP_OWNER, FP_OWNER.lower(), "sha-256 " + FP_OWNER, "SHA-256 " + FP_OWNER.lower(),
             FP_OWNER.replace(":", ""), "  sha-256   " + FP_OWNER + "\n"]
    assert {normalize_dtls_fingerprint(f) for f in forms} == {FP_OWNER}
    base = transcript(**transcript_args())
    for f in forms:
        assert transcript(**transcript_args(owner_dtls_fingerprint=f)) == base
    for bad in ["sha-1 " + FP_OWNER, FP_OWNER[:-3], "zz" + FP_OWNER[2:], "", "sha-256", "a b c", FP_OWNER + ":00"]:
        with pytest.raises(PairingError, match="fingerprint"):
            normalize_dtls_fingerprint(bad)


def test_transcript_validates_inputs() -> None:
    for changes in [dict(room_id="nothex"), dict(session_id=b"x"), dict(signer_role="admin"),
                    dict(signer_public_key=b"x"), dict(owner_name=None), dict(scientist_name=b"Sam")]:
        with pytest.raises(PairingError):
            transcript(**transcript_args(**changes))


def test_verify_rejects_malformed_inputs() -> None:
    signer = Identity.ephemeral()
    sig = signer.sign(b"m")
    for key, message, signature in [
        (b"short", b"m", sig),
        (signer.public_key, b"m", sig[:-1]),
        (signer.public_key, "m", sig),
        (signer.public_key, b"m", bytes(64)),
        (bytes(32), b"m", sig),  # small-order key
        (signer.public_key, b"n", sig),
    ]:
        with pytest.raises(PairingError, match="does not verify"):
            verify(key, message, signature)  # type: ignore[arg-type]
    verify(signer.public_key, b"m", sig)
