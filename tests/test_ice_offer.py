"""ICE servers configured once on the signaling service, with TURN REST credentials per registration."""
from __future__ import annotations

import asyncio
import base64
import logging
import time

import pytest

import duet
from duet.connect import ice_config
from duet.signaling_client import SignalingClient, offered_ice_servers
from duet_signaling.__main__ import main as signaling_main
from duet_signaling.ice import IceOffer, turn_credential
from tests.procs.helpers import start_signaling

ROOM = "ab" * 16


def test_turn_credential_is_base64_hmac_sha1_of_the_username():
    # HMAC-SHA1 known answer (key "key", the quick brown fox): de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9
    want = base64.b64encode(bytes.fromhex("de7c9b85b8b78aa6bc8a7a36f70a90701c9db4d9")).decode()
    assert turn_credential("key", "The quick brown fox jumps over the lazy dog") == want


def test_offer_makes_expiring_turn_credentials_and_never_shows_the_secret():
    offer = IceOffer(stun_urls=["stun:198.18.0.1:3478"],
                     turn_urls=["turn:198.18.0.1:3478", "turn:198.18.0.1:3478?transport=tcp"],
                     turn_secret="s3cret", ttl_seconds=600)
    servers = offer.servers_for("owner-1234", now=1_000_000)
    assert servers[0] == {"urls": "stun:198.18.0.1:3478"}
    for turn in servers[1:]:
        assert turn["username"] == "1000600:owner-1234"
        assert turn["credential"] == turn_credential("s3cret", "1000600:owner-1234")
    assert "s3cret" not in repr(servers)


@pytest.mark.parametrize("kwargs,match", [
    ({"stun_urls": ["turn:x:3478"]}, "stun: URLs"),
    ({"turn_urls": ["stun:x"], "turn_secret": "s"}, "turn: or turns:"),
    ({"turn_urls": ["turn:x:3478"]}, "needs --turn-secret"),
    ({"stun_urls": ["http://x"]}, "not a STUN/TURN URL"),
    ({"stun_urls": ["stun:x y"]}, "not a STUN/TURN URL"),
    ({"turn_urls": ["turn:x"], "turn_secret": "s", "ttl_seconds": 0}, "positive"),
])
def test_bad_service_options_are_refused_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IceOffer(**kwargs)


def test_the_command_line_refuses_a_turn_url_without_a_secret(capsys, monkeypatch):
    monkeypatch.delenv("DUET_TURN_SECRET", raising=False)
    assert signaling_main(["--port", "0", "--turn-url", "turn:198.18.0.1:3478"]) == 2
    assert "needs --turn-secret" in capsys.readouterr().err


def test_a_real_service_hands_servers_at_registration(monkeypatch):
    monkeypatch.setenv("DUET_TURN_SECRET", "from-the-environment")  # the secret never in a process list
    proc, url = start_signaling("--ice-server", "stun:198.18.0.1:3478", "--turn-url", "turn:198.18.0.1:3478",
                                "--turn-ttl-seconds", "120")
    try:
        async def register():
            client = await SignalingClient.connect(url, ROOM, "owner", timeout=10)
            try:
                return client.ice_servers
            finally:
                await client.close()

        before = time.time()
        servers = asyncio.run(register())
        assert servers[0] == {"urls": "stun:198.18.0.1:3478"}
        turn = servers[1]
        expiry, label = turn["username"].split(":", 1)
        assert before + 110 <= int(expiry) <= time.time() + 121 and label.startswith("owner-")
        assert turn["credential"] == turn_credential("from-the-environment", turn["username"])
        # an owner that names no servers uses the service's; local_only ignores them
        owner = duet.launch(signaling=url, local_only=False, display=False)
        try:
            assert [s["urls"] for s in owner.signaling.ice.servers] == ["stun:198.18.0.1:3478", "turn:198.18.0.1:3478"]
        finally:
            owner.close()
        owner = duet.launch(signaling=url, local_only=True, display=False)
        try:
            assert owner.signaling.ice.servers == []
        finally:
            owner.close()
    finally:
        proc.stop()


def test_explicit_servers_win_then_the_environment_then_the_service(monkeypatch):
    offered = [{"urls": "stun:198.18.0.1:3478"}]
    monkeypatch.delenv("DUET_ICE_SERVERS", raising=False)
    monkeypatch.delenv("DUET_LOCAL_ONLY", raising=False)
    assert ice_config(False, None, offered).servers == offered
    assert ice_config(False, [], offered).servers == []  # an explicit empty list is a choice too
    assert ice_config(False, ["stun:198.18.0.2"], offered).servers == ["stun:198.18.0.2"]
    monkeypatch.setenv("DUET_ICE_SERVERS", '["stun:198.18.0.3:3478"]')
    assert ice_config(False, None, offered).servers == ["stun:198.18.0.3:3478"]
    monkeypatch.setenv("DUET_ICE_SERVERS", "stun:no-json")
    with pytest.raises(ValueError, match="not JSON"):
        ice_config(False, None, offered)


@pytest.mark.parametrize("bad", [
    "stun:x", [{"urls": "http://evil"}], [{"urls": ["stun:a"]}], [{"urls": "stun:a", "username": 5}],
    [{"urls": "stun:a"}] * 9, [{"urls": "stun:" + "a" * 300}], [{"urls": "stun:a\nb"}],
])
def test_a_malformed_offer_from_the_untrusted_service_is_ignored(bad, caplog):
    with caplog.at_level(logging.WARNING, logger="duet.signaling"):
        assert offered_ice_servers(bad, "http://127.0.0.1:1") == []
    assert "malformed ICE server list" in caplog.text


def test_the_jupyter_extension_offers_the_same_servers(monkeypatch):
    from traitlets.config import Config

    from duet_jupyter import DuetSignaling

    monkeypatch.setenv("DUET_TURN_SECRET", "team-secret")
    config = Config()
    config.DuetSignaling.ice_servers = ["stun:198.18.0.1:3478"]
    config.DuetSignaling.turn_urls = ["turn:198.18.0.1:3478?transport=tcp"]
    servers = DuetSignaling(config=config).ice().servers_for("scientist-1", now=0)
    assert servers[1]["credential"] == turn_credential("team-secret", servers[1]["username"])
    assert DuetSignaling().ice().empty  # nothing offered unless configured
    config.DuetSignaling.turn_urls = ["stun:198.18.0.1"]
    with pytest.raises(ValueError, match="turn: or turns:"):
        DuetSignaling(config=config).ice()
