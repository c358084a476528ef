"""The Jupyter server extension (``duet_jupyter``) and its discovery from kernels.

In-process tests use pytest-jupyter's server fixtures (``jp_serverapp``,
``jp_fetch``, ``jp_ws_fetch``); the ``slow`` ones start a real ``jupyter server``
process on 127.0.0.1, pair through it, and run discovery inside a real kernel
that server started. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from tests.waiting import eventually as _eventually
from tests.waiting import until
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from tornado.httpclient import HTTPClientError
from traitlets.config import Config

import duet
import duet_jupyter
from duet.errors import SignalingError
from duet.signaling_client import SignalingClient, SignalingEvent
from duet_jupyter import discovery
from duet_jupyter.discovery import find_jupyter_signaling_url

pytest_plugins = ["pytest_jupyter.jupyter_server"]
pytestmark = pytest.mark.timeout(120)

ROOM = "c0ffee00c0ffee00c0ffee00c0ffee00"  # what the relay sees; must never be shown
ROOM2 = "deadbeef00000000deadbeef00000000"
PAYLOAD = "sealed-payload-7f3a9e"  # stands for a sealed message; must never be shown
WAIT = 5.0
REAL_TOKEN = "real-server-token-4d1c"


# ----------------------------------------------------------- server fixtures
def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def extra_config() -> Dict[str, Any]:
    """Overridden with ``@pytest.mark.parametrize("extra_config", [...])``."""
    return {}


@pytest.fixture
def jp_server_config(extra_config: Dict[str, Any]) -> Config:
    config = {
        "ServerApp": {
            "ip": "127.0.0.1",
            "jpserver_extensions": {"duet_jupyter": True, "jupyter_server_terminals": False},
        }
    }
    return Config(_merge(config, extra_config))


@pytest.fixture
def jp_base_url(request: pytest.FixtureRequest) -> str:
    """pytest-jupyter's default (an escaped '@' in a prefix) unless parametrized."""
    return getattr(request, "param", "/a%40b/")


@pytest.fixture
def signaling_url(jp_serverapp: Any, http_server_client: Any, jp_http_port: int, jp_base_url: str) -> str:
    # http_server_client: the test server only listens once that fixture exists
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}duet"


@pytest.fixture(autouse=True)
def _close_relay(jp_asyncio_loop: Any) -> Iterator[None]:
    """Close the relay after in-process server tests, so its sweeper does not outlive the loop."""
    yield
    app = getattr(ServerApp, "_instance", None)  # pytest-jupyter clears it after this runs
    web_app = getattr(app, "web_app", None)
    state = web_app.settings.get(duet_jupyter.STATE_SETTING) if web_app is not None else None
    if state is not None and not jp_asyncio_loop.is_closed():
        jp_asyncio_loop.run_until_complete(state.close(timeout=2.0))


async def anon(http_server_client: Any, jp_base_url: str, path: str) -> Any:
    """A request without any Jupyter credentials (no token, no cookie)."""
    return await http_server_client.fetch(
        url_path_join(jp_base_url, path), raise_error=False, follow_redirects=False, request_timeout=WAIT
    )


async def expect(client: SignalingClient, kind: str) -> SignalingEvent:
    event = await client.recv(timeout=WAIT)
    assert event.kind == kind, event
    return event


async def pair_and_relay(url: str) -> None:
    """Owner and scientist meet in a room at ``url`` and relay one message each way."""
    owner = await SignalingClient.connect(url, ROOM, "owner", timeout=WAIT)
    scientist = await SignalingClient.connect(url, ROOM, "scientist", timeout=WAIT)
    try:
        joined = await expect(owner, "peer_joined")
        assert joined.peer == scientist.peer_id
        await scientist.send(PAYLOAD)
        got = await expect(owner, "msg")
        assert (got.peer, got.data) == (scientist.peer_id, PAYLOAD)
        await owner.send("answer", to=scientist.peer_id)
        back = await expect(scientist, "msg")
        assert (back.peer, back.data) == ("owner", "answer")
    finally:
        await scientist.close()
        await owner.close()



async def eventually(predicate: Any, timeout: float = WAIT) -> None:
    """Server-side state trails what the client already saw by a loop turn; wait for it, bounded."""
    await _eventually(predicate, timeout)


# ------------------------------------------------------------------ mounting
def test_extension_points() -> None:
    assert duet_jupyter._jupyter_server_extension_points() == [{"module": "duet_jupyter"}]


def test_config_file_enables_the_extension() -> None:
    path = Path(__file__).parents[1] / "jupyter-config" / "jupyter_server_config.d" / "duet_jupyter.json"
    assert json.loads(path.read_text()) == {"ServerApp": {"jpserver_extensions": {"duet_jupyter": True}}}


@pytest.mark.parametrize("jp_base_url", ["/", "/user/a%40b/"], indirect=True)
async def test_health_needs_no_token(jp_serverapp: Any, http_server_client: Any, jp_base_url: str) -> None:
    response = await anon(http_server_client, jp_base_url, "duet/health")
    assert response.code == 200
    assert json.loads(response.body) == {"status": "ok", "rooms": 0, "peers": 0}


@pytest.mark.parametrize("jp_base_url", ["/", "/user/a%40b/"], indirect=True)
async def test_relay_works_without_a_token(signaling_url: str, jp_serverapp: Any) -> None:
    await pair_and_relay(signaling_url)
    state = jp_serverapp.web_app.settings[duet_jupyter.STATE_SETTING]
    await eventually(lambda: state.connection_count == 0)
    assert state.stats()["counters"]["messages_relayed"] == 2


async def test_relay_through_jp_ws_fetch(jp_ws_fetch: Any, signaling_url: str) -> None:
    # A wrong token changes nothing: the relay does not look at Jupyter credentials.
    ws = await jp_ws_fetch("duet", "ws", headers={"Authorization": "token not-the-token"})
    try:
        await ws.write_message(json.dumps({"op": "join", "room": ROOM, "role": "owner"}))
        assert json.loads(await asyncio.wait_for(ws.read_message(), WAIT)) == {"op": "joined", "peer": "owner"}
        scientist = await SignalingClient.connect(signaling_url, ROOM, "scientist", timeout=WAIT)
        try:
            joined = json.loads(await asyncio.wait_for(ws.read_message(), WAIT))
            assert joined == {"op": "peer_joined", "peer": scientist.peer_id}
            await scientist.send(PAYLOAD)
            msg = json.loads(await asyncio.wait_for(ws.read_message(), WAIT))
            assert msg == {"op": "msg", "from": scientist.peer_id, "data": PAYLOAD}
            await ws.write_message(json.dumps({"op": "send", "to": scientist.peer_id, "data": "hi"}))
            back = await expect(scientist, "msg")
            assert (back.peer, back.data) == ("owner", "hi")
        finally:
            await scientist.close()
    finally:
        ws.close()


# -------------------------------------------------------------- status page
@pytest.mark.parametrize("jp_base_url", ["/", "/user/a%40b/"], indirect=True)
async def test_status_requires_jupyter_auth(
    jp_fetch: Any, http_server_client: Any, jp_base_url: str
) -> None:
    page = await anon(http_server_client, jp_base_url, "duet/")
    assert page.code == 302 and "login" in page.headers["Location"]
    for path in ("duet/status", "duet"):
        response = await anon(http_server_client, jp_base_url, path)
        assert response.code in (302, 403), path
    assert (await anon(http_server_client, jp_base_url, "duet/status")).code == 403
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("duet", "status", headers={"Authorization": "token wrong"})
    assert info.value.code == 403
    ok = await jp_fetch("duet", "status")
    assert ok.code == 200 and ok.headers["Content-Type"].startswith("application/json")
    html = await jp_fetch("duet/")
    assert html.code == 200 and html.headers["Content-Type"].startswith("text/html")
    assert b"Duet signaling" in html.body


async def test_status_shows_counts_never_secrets(jp_fetch: Any, signaling_url: str, jp_serverapp: Any) -> None:
    owner = await SignalingClient.connect(signaling_url, ROOM, "owner", timeout=WAIT)
    scientist = await SignalingClient.connect(signaling_url, ROOM, "scientist", timeout=WAIT)
    try:
        await expect(owner, "peer_joined")
        await scientist.send(PAYLOAD)
        await expect(owner, "msg")
        status = json.loads((await jp_fetch("duet", "status")).body)
        assert (status["rooms"], status["peers"], status["connections"]) == (1, 2, 2)
        assert status["counters"]["messages_relayed"] == 1
        assert status["limits"]["max_rooms"] == duet_jupyter.DuetSignaling().max_rooms
        assert status["endpoints"]["ws"].endswith("/duet/ws")
        page = (await jp_fetch("duet/")).body.decode()
        assert "rooms open" in page and signaling_url in page
        for body in (json.dumps(status), page):
            assert ROOM not in body and ROOM[:6] not in body
            assert PAYLOAD not in body
            assert scientist.peer_id not in body
            assert jp_serverapp.identity_provider.token not in body
    finally:
        await scientist.close()
        await owner.close()


@pytest.mark.parametrize("extra_config", [{"ServerApp": {"allow_unauthenticated_access": False}}])
async def test_locked_down_server_keeps_relay_public_status_private(
    jp_serverapp: Any, http_server_client: Any, jp_base_url: str, signaling_url: str
) -> None:
    assert jp_serverapp.web_app.settings["allow_unauthenticated_access"] is False
    # Every mounted handler says explicitly whether it is public: no auth warning.
    handlers = duet_jupyter.make_jupyter_handlers(duet_jupyter.SignalingState(), jp_base_url)
    for pattern, handler, _ in handlers:
        assert jp_serverapp.web_app._check_handler_auth(pattern, handler) == []
    assert (await anon(http_server_client, jp_base_url, "duet/health")).code == 200
    assert (await anon(http_server_client, jp_base_url, "duet/status")).code == 403
    await pair_and_relay(signaling_url)


@pytest.mark.parametrize("extra_config", [{"DuetSignaling": {"max_rooms": 1, "peers_per_room": 2}}])
async def test_limits_come_from_jupyter_config(jp_fetch: Any, signaling_url: str) -> None:
    limits = json.loads((await jp_fetch("duet", "status")).body)["limits"]
    assert (limits["max_rooms"], limits["peers_per_room"]) == (1, 2)
    owner = await SignalingClient.connect(signaling_url, ROOM, "owner", timeout=WAIT)
    scientist = await SignalingClient.connect(signaling_url, ROOM, "scientist", timeout=WAIT)
    try:
        with pytest.raises(SignalingError) as info:
            await SignalingClient.connect(signaling_url, ROOM2, "owner", timeout=WAIT)
        assert info.value.code == "too_many_rooms"  # type: ignore[attr-defined]
        with pytest.raises(SignalingError) as info:
            await SignalingClient.connect(signaling_url, ROOM, "scientist", timeout=WAIT)
        assert info.value.code == "room_full"  # type: ignore[attr-defined]
    finally:
        await scientist.close()
        await owner.close()


@pytest.mark.parametrize("extra_config", [{"DuetSignaling": {"peers_per_room": 1}}])
async def test_invalid_limits_mount_nothing(jp_serverapp: Any, http_server_client: Any, jp_base_url: str) -> None:
    assert duet_jupyter.STATE_SETTING not in jp_serverapp.web_app.settings
    assert (await anon(http_server_client, jp_base_url, "duet/health")).code == 404


@pytest.mark.parametrize("extra_config", [{"ServerApp": {"jpserver_extensions": {"duet_jupyter": False}}}])
async def test_disabled_extension_mounts_nothing(jp_serverapp: Any, http_server_client: Any, jp_base_url: str) -> None:
    assert (await anon(http_server_client, jp_base_url, "duet/health")).code == 404
    assert (await anon(http_server_client, jp_base_url, "duet/ws")).code == 404


# ----------------------------------------------------------------- discovery
def _write_server_file(runtime_dir: Path, name: str, url: str, pid: int) -> Path:
    path = runtime_dir / f"jpserver-{name}.json"
    path.write_text(json.dumps({"url": url, "pid": pid, "token": "", "sock": "", "base_url": "/"}))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(discovery.ENV_VAR, raising=False)


async def test_discovery_finds_the_single_server(
    jp_serverapp: Any, signaling_url: str, no_override: None
) -> None:
    # jp_serverapp wrote its jpserver-<pid>.json into the test's runtime dir.
    assert await asyncio.to_thread(find_jupyter_signaling_url, WAIT) == signaling_url
    await pair_and_relay(signaling_url)


async def test_discovery_refuses_to_guess_between_servers(
    jp_serverapp: Any, http_server_client: Any, monkeypatch: pytest.MonkeyPatch, no_override: None
) -> None:
    _write_server_file(Path(jp_serverapp.runtime_dir), "decoy", f"http://127.0.0.1:{_closed_port()}/", os.getpid())
    with pytest.raises(SignalingError, match="2 Jupyter servers are running"):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)
    monkeypatch.setattr(discovery, "_current_kernel_id", lambda: "no-such-kernel")
    with pytest.raises(SignalingError, match="none could be matched to this kernel"):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)


def test_discovery_without_any_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_override: None
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(SignalingError, match="no running Jupyter server was found"):
        find_jupyter_signaling_url(1.0)


@pytest.mark.parametrize("extra_config", [{"ServerApp": {"jpserver_extensions": {"duet_jupyter": False}}}])
async def test_discovery_says_when_the_extension_is_not_enabled(
    jp_serverapp: Any, http_server_client: Any, no_override: None
) -> None:
    with pytest.raises(SignalingError, match="jupyter server extension enable duet_jupyter"):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)


async def test_discovery_unreachable_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_override: None) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    _write_server_file(tmp_path, "gone", f"http://127.0.0.1:{_closed_port()}/", os.getpid())
    with pytest.raises(SignalingError, match="could not reach"):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)


async def test_env_var_overrides_discovery(
    jp_serverapp: Any, jp_http_port: int, jp_base_url: str, signaling_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    _write_server_file(Path(jp_serverapp.runtime_dir), "decoy", f"http://127.0.0.1:{_closed_port()}/", os.getpid())
    cases = {
        server: signaling_url,
        server.rstrip("/"): signaling_url,
        server + "?token=must-not-leak": signaling_url,  # a pasted token never reaches the join code
        signaling_url: signaling_url,
        signaling_url + "/": signaling_url,
        "ws" + server[len("http"):]: "ws" + signaling_url[len("http"):],
    }
    for value, expected in cases.items():
        monkeypatch.setenv(discovery.ENV_VAR, value)
        assert await asyncio.to_thread(find_jupyter_signaling_url, WAIT) == expected, value
    monkeypatch.setenv(discovery.ENV_VAR, "not a url")
    with pytest.raises(SignalingError, match=discovery.ENV_VAR):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)
    monkeypatch.setenv(discovery.ENV_VAR, f"http://127.0.0.1:{jp_http_port}/elsewhere/")
    with pytest.raises(SignalingError, match="not enabled"):
        await asyncio.to_thread(find_jupyter_signaling_url, WAIT)


# ------------------------------------------------- a real jupyter server process
class RealServer:
    def __init__(self, proc: "subprocess.Popen[bytes]", url: str, runtime_dir: Path, log: Path) -> None:
        self.proc = proc
        self.url = url  # ends with '/'
        self.runtime_dir = runtime_dir
        self.log = log

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Authorization": f"token {REAL_TOKEN}"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    root = tmp_path_factory.mktemp("real-jupyter")
    dirs = {name: root / name for name in ("runtime", "config", "data", "ipython", "notebooks", "duet")}
    for path in dirs.values():
        path.mkdir()
    env = dict(os.environ)
    env.pop(discovery.ENV_VAR, None)
    env.update(
        JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_CONFIG_DIR=str(dirs["config"]),
        JUPYTER_DATA_DIR=str(dirs["data"]),
        IPYTHONDIR=str(dirs["ipython"]),
        DUET_CONFIG_DIR=str(dirs["duet"]),
        JUPYTER_PLATFORM_DIRS="1",
    )
    port = _free_port()
    extensions = {
        "duet_jupyter": True,
        # other extensions installed in this environment only slow the start down
        "jupyterlab": False,
        "jupyter_lsp": False,
        "notebook_shim": False,
        "jupyter_server_terminals": False,
    }
    cmd = [
        sys.executable, "-m", "jupyter_server",
        "--no-browser", "--allow-root",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={REAL_TOKEN}", "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={dirs['notebooks']}", "--ServerApp.base_url=/jh/user/",
        f"--ServerApp.jpserver_extensions={extensions!r}",
    ]  # fmt: skip
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=dirs["notebooks"])
    server = RealServer(proc, f"http://127.0.0.1:{port}/jh/user/", dirs["runtime"], log)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"jupyter server exited early:\n{server.log_tail()}"
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    server.url + "duet/health", timeout=1
                ).close()
                return True
            except (OSError, urllib.error.URLError):
                return False

        until(healthy, 60, "the jupyter server answering")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_real_server_pairs_without_token(real_server: RealServer) -> None:
    url = real_server.url + "duet"
    asyncio.run(asyncio.wait_for(pair_and_relay(url), 30))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(real_server.url + "duet/status", timeout=WAIT)
    assert info.value.code == 403
    status = real_server.api("GET", "duet/status")
    assert status["counters"]["messages_relayed"] == 2 and status["rooms"] == 0


@pytest.mark.slow
def test_real_server_discovery_from_outside(real_server: RealServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(discovery.ENV_VAR, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(real_server.runtime_dir))
    assert find_jupyter_signaling_url(WAIT) == real_server.url + "duet"


class RealKernel:
    """A kernel started by the real server (as a notebook would start it), driven over ZMQ."""

    def __init__(self, client: Any, kernel_id: str) -> None:
        self.client = client
        self.kernel_id = kernel_id

    def run(self, code: str, timeout: float = 60.0) -> str:
        """Execute ``code``; return what it printed. Fails the test on an exception in the kernel."""
        out: List[str] = []

        def hook(msg: Dict[str, Any]) -> None:
            if msg["header"]["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["header"]["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        return text

    def result(self, code: str, timeout: float = 60.0) -> Any:
        """Run ``code``, which prints ``RESULT <json>``; return the decoded value."""
        text = self.run(code, timeout)
        line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
        assert line is not None, text
        return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def real_kernel(real_server: RealServer) -> Iterator[RealKernel]:
    from jupyter_client import BlockingKernelClient

    kernel_id = real_server.api("POST", "api/kernels", {"name": "python3"})["id"]
    client = None
    try:
        connection_file = real_server.runtime_dir / f"kernel-{kernel_id}.json"
        until(connection_file.exists, 30, "the kernel's connection file")
        client = BlockingKernelClient(connection_file=str(connection_file))
        client.load_connection_file()
        # No heartbeat channel: this client does not own the kernel, and on a loaded
        # machine a kernel still importing misses heartbeats and would be taken for dead.
        client.start_channels(hb=False)
        client.wait_for_ready(timeout=60)
        yield RealKernel(client, kernel_id)
    finally:
        if client is not None:
            client.stop_channels()
        try:
            real_server.api("DELETE", f"api/kernels/{kernel_id}", timeout=20)
        except (OSError, urllib.error.URLError):
            pass


@pytest.mark.slow
def test_real_kernel_finds_its_own_server(real_server: RealServer, real_kernel: RealKernel) -> None:
    # A second (decoy) server is listed, so picking "the only one" is not enough:
    # the kernel must recognise the server that started it.
    decoy = _write_server_file(real_server.runtime_dir, "decoy", f"http://127.0.0.1:{_closed_port()}/", os.getpid())
    try:
        found = real_kernel.result(
            "import json\n"
            "from duet_jupyter import discovery as _d\n"
            "_by_parent = _d.find_jupyter_signaling_url(timeout=10)\n"
            "_saved, _d._ancestor_pids = _d._ancestor_pids, lambda: []  # only /api/kernels can tell now\n"
            "try:\n"
            "    _by_api = _d.find_jupyter_signaling_url(timeout=10)\n"
            "finally:\n"
            "    _d._ancestor_pids = _saved\n"
            "print('RESULT', json.dumps([_by_parent, _by_api, _d._current_kernel_id()]))\n"
        )
    finally:
        decoy.unlink(missing_ok=True)
    expected = real_server.url + "duet"
    assert found == [expected, expected, real_kernel.kernel_id]


def _needs_launch() -> None:
    if not (hasattr(duet, "launch") and hasattr(duet, "join")):
        pytest.skip("launch not available yet")


@pytest.mark.slow
def test_real_server_owner_and_scientist_over_webrtc(request: pytest.FixtureRequest) -> None:
    _needs_launch()
    import torch

    from duet.pairing import JoinCode

    real_server: RealServer = request.getfixturevalue("real_server")
    url = real_server.url + "duet"
    before = real_server.api("GET", "duet/status")["counters"]
    owner = duet.launch(name="o", signaling=url, local_only=True)
    scientist = None
    try:
        assert JoinCode.parse(owner.code).signaling_url == url
        owner.store.add(torch.tensor([1.0, 2.0, 3.0]), name="x")
        owner.requests.add_handler(action="accept", datasets=["x"])
        scientist = duet.join(owner.code, name="s", local_only=True)
        assert scientist.store["x"].sum().get(timeout=30).item() == 6.0
    finally:
        if scientist is not None:
            scientist.close()
        owner.close()
    after = real_server.api("GET", "duet/status")["counters"]
    assert after["rooms_created"] == before["rooms_created"] + 1
    assert after["messages_relayed"] > before["messages_relayed"]  # the pairing went through this server


@pytest.mark.slow
def test_notebook_owner_launches_with_signaling_jupyter(request: pytest.FixtureRequest) -> None:
    """The issue's user story: an owner's notebook says signaling="jupyter"; the
    scientist, elsewhere and without any Jupyter token, joins with the code alone."""
    _needs_launch()
    real_server: RealServer = request.getfixturevalue("real_server")
    real_kernel: RealKernel = request.getfixturevalue("real_kernel")
    code = real_kernel.result(
        "import json, duet, torch\n"
        "owner = duet.launch(name='notebook owner', signaling='jupyter', local_only=True, display=False)\n"
        "owner.store.add(torch.tensor([1., 2., 3.]), name='x')\n"
        "owner.requests.add_handler(action='accept', datasets=['x'])\n"
        "print('RESULT', json.dumps(owner.code))\n",
        timeout=90,
    )
    try:
        from duet.pairing import JoinCode

        assert JoinCode.parse(code).signaling_url == real_server.url + "duet"  # the code carries the address
        scientist = duet.join(code, name="s", local_only=True)
        try:
            assert scientist.store["x"].sum().get(timeout=30).item() == 6.0
        finally:
            scientist.close()
    finally:
        real_kernel.run("owner.close()", timeout=30)
