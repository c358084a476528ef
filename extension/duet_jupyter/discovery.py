"""Find the Duet signaling endpoint of the Jupyter server that runs this kernel.

Used by ``duet.launch(signaling="jupyter")``. In order:

1. ``DUET_JUPYTER_URL``, if set, names the server (e.g. the public address of a
   server behind a proxy, which the kernel cannot guess). Any ``?token=...`` in
   it is dropped: a Jupyter token must never end up in a join code.
2. Otherwise the running servers are read from their ``jpserver-*.json``
   runtime files. The one hosting this kernel is the one whose process is an
   ancestor of the kernel, or, failing that, the one whose ``/api/kernels``
   knows this kernel's id (asked with that server's own token). If nothing
   matches and exactly one server runs, that one is used.
3. ``<server>/duet/health`` must answer, proving the extension is enabled.

Returns ``<server url>/duet`` (e.g. ``http://127.0.0.1:8888/duet``), the URL to
put in the join code. Every network wait shares one ``timeout`` budget, and
every failure is a ``SignalingError`` that says what to do.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from duet.errors import SignalingError

__all__ = ["ENV_VAR", "find_jupyter_signaling_url", "list_servers"]

#: Environment variable naming the Jupyter server to use, overriding discovery.
ENV_VAR = "DUET_JUPYTER_URL"
MOUNT = "duet"  # the same as duet_jupyter.MOUNT; not imported to keep this light

_KERNEL_FILE_RE = re.compile(r"kernel-(.+)\.json\Z")
_SERVER_FILE_RE = re.compile(r"jpserver-(.+)\.json\Z")
_MAX_ANCESTORS = 16
_HINT = (
    'pass the signaling URL explicitly, e.g. duet.launch(signaling="http://HOST:PORT/BASE/duet"), '
    f"or set {ENV_VAR} to the Jupyter server's URL"
)
_ENABLE_HINT = "enable it with `jupyter server extension enable duet_jupyter` and restart the server"


def find_jupyter_signaling_url(timeout: float = 5.0) -> str:
    """The Duet signaling URL of the Jupyter server that runs this kernel.

    Raises ``SignalingError`` if no server is found, if several run and none
    can be matched to this kernel, or if the server does not answer on
    ``/duet/health`` (the ``duet_jupyter`` extension is not enabled). Waits at
    most about ``timeout`` seconds in total.
    """
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    deadline = time.monotonic() + timeout
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return _from_override(override, deadline)

    servers = [s for s in list_servers() if _http_url(s) is not None]
    if not servers:
        raise SignalingError(
            "no running Jupyter server was found (no jpserver-*.json in the Jupyter runtime "
            f"directory {_runtime_dir()!r}); {_HINT}"
        )
    server = _hosting_server(servers, deadline)
    if server is None:
        if len(servers) == 1:
            server = servers[0]
        else:
            listed = ", ".join(sorted(_http_url(s) or "?" for s in servers))
            raise SignalingError(
                f"{len(servers)} Jupyter servers are running ({listed}) and none could be matched "
                f"to this kernel; {_HINT}"
            )
    base = _http_url(server)
    assert base is not None
    return _verify(base, deadline, source="the Jupyter server running this kernel")


def list_servers() -> List[Dict[str, Any]]:
    """Info dicts of running Jupyter servers (``jupyter_server``'s own list when installed)."""
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        return list(_read_server_files(_runtime_dir()))
    return list(list_running_servers())


# ---------------------------------------------------------------- helpers
def _runtime_dir() -> str:
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:  # pragma: no cover - jupyter_core comes with ipykernel
        return os.path.expanduser("~/.local/share/jupyter/runtime")
    return jupyter_runtime_dir()


def _read_server_files(runtime_dir: str) -> List[Dict[str, Any]]:
    """Fallback reader of ``jpserver-*.json`` for kernels without jupyter_server."""
    found: List[Dict[str, Any]] = []
    try:
        names = sorted(os.listdir(runtime_dir))
    except OSError:
        return found
    for name in names:
        if not _SERVER_FILE_RE.match(name):
            continue
        try:
            with open(os.path.join(runtime_dir, name), encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("pid"), int) and _pid_alive(info["pid"]):
            found.append(info)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _http_url(info: Dict[str, Any]) -> Optional[str]:
    """The server's base URL, ending in '/', if it is an http(s) one (not a UNIX socket)."""
    url = info.get("url")
    if not isinstance(url, str) or info.get("sock"):
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _current_kernel_id() -> Optional[str]:
    """This kernel's id, from its connection file name; None outside a kernel."""
    try:
        from ipykernel.kernelapp import IPKernelApp
    except ImportError:
        return None
    # Never create a kernel app outside a kernel, and note that initialized() is
    # also true when a sibling singleton (e.g. a Jupyter ServerApp) exists.
    app = getattr(IPKernelApp, "_instance", None)
    if not isinstance(app, IPKernelApp):
        return None
    connection_file = getattr(app, "connection_file", "") or ""
    match = _KERNEL_FILE_RE.match(os.path.basename(connection_file))
    return match.group(1) if match else None


def _ancestor_pids() -> List[int]:
    """Parent, grandparent, ... of this process (bounded); just the parent where /proc is missing."""
    pids: List[int] = []
    pid = os.getppid()
    for _ in range(_MAX_ANCESTORS):
        if pid <= 1 or pid in pids:
            break
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            break
    return pids


def _hosting_server(servers: List[Dict[str, Any]], deadline: float) -> Optional[Dict[str, Any]]:
    """The server that runs this kernel, or None if it cannot be told."""
    ancestors = _ancestor_pids()
    for pid in ancestors:  # nearest ancestor first
        for server in servers:
            if server.get("pid") == pid:
                return server
    kernel_id = _current_kernel_id()
    if kernel_id is None:
        return None
    for server in servers:
        if time.monotonic() >= deadline:
            break
        if _server_has_kernel(server, kernel_id, deadline):
            return server
    return None


def _server_has_kernel(server: Dict[str, Any], kernel_id: str, deadline: float) -> bool:
    base = _http_url(server)
    if base is None:
        return False
    url = base + "api/kernels/" + urllib.parse.quote(kernel_id, safe="")
    headers = {"Accept": "application/json"}
    token = server.get("token")
    if isinstance(token, str) and token:
        headers["Authorization"] = f"token {token}"
    try:
        status, _ = _get(url, headers, deadline)
    except OSError:
        return False
    return status == 200


def _get(url: str, headers: Dict[str, str], deadline: float, env_proxy: bool = False) -> Tuple[int, bytes]:
    """GET with what is left of the budget; (status, body). Raises OSError if unreachable.

    Servers found on this machine are asked directly, never through an
    ``http_proxy`` from the environment; a URL the user named may need one.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("out of time")
    request = urllib.request.Request(url, headers=headers, method="GET")
    handlers: List[Any] = [_NoRedirect()]
    if not env_proxy:
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=remaining) as response:
            return response.status, response.read(65536)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, b""
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, OSError):
            raise reason from None
        raise OSError(str(reason)) from None
    except http.client.HTTPException as exc:  # e.g. not HTTP at all on that port
        raise OSError(f"bad HTTP answer ({type(exc).__name__})") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect (e.g. to a login page) is an answer, not something to follow."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _verify(base: str, deadline: float, source: str, also_as_is: bool = False, env_proxy: bool = False) -> str:
    """Check ``<base>duet/health`` and return ``<base>duet`` (http(s) scheme)."""
    candidates = [base + MOUNT]
    if also_as_is and base.rstrip("/").endswith("/" + MOUNT):
        candidates.append(base.rstrip("/"))  # the URL already named the /duet endpoint
    status = None
    for url in candidates:
        try:
            status, body = _get(url + "/health", {"Accept": "application/json"}, deadline, env_proxy)
        except ssl.SSLError as exc:
            raise SignalingError(f"could not reach {source} at {base}: TLS error ({exc}); {_HINT}") from None
        except TimeoutError:
            raise SignalingError(
                f"{source} at {base} did not answer on /{MOUNT}/health in time; is it busy or unreachable? {_HINT}"
            ) from None
        except OSError as exc:
            raise SignalingError(f"could not reach {source} at {base}: {exc}; {_HINT}") from None
        if status == 200 and _is_health(body):
            return url
    raise SignalingError(
        f"{source} at {base} does not serve Duet signaling (/{MOUNT}/health answered HTTP {status}): "
        f"the duet_jupyter server extension is not enabled there; {_ENABLE_HINT}"
    )


def _is_health(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("status") == "ok"


def _from_override(value: str, deadline: float) -> str:
    parts = urllib.parse.urlsplit(value)
    scheme = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc or "@" in parts.netloc:
        raise SignalingError(
            f"{ENV_VAR}={value!r} is not a usable URL: expected http(s)://HOST[:PORT][/BASE_URL] "
            "(the Jupyter server's address, without user names or passwords)"
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    base = urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))  # drops ?token=...
    found = _verify(base, deadline, source=f"the Jupyter server named by {ENV_VAR}", also_as_is=True, env_proxy=True)
    if parts.scheme.lower() in ("ws", "wss"):  # keep the scheme family the user chose
        found = parts.scheme.lower() + found[len(scheme):]
    return found
