"""Web pages as clients: the origins whose pages may call the daemon (CORS), and the Host check
that keeps a page out whose name was rebound to this machine's loopback address (DNS rebinding)."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

from .config import ServerConfig
from .server import Request, Response, StreamingResponse, error_response

# Ollama's: pages served from this machine, and the webviews of desktop apps and editors.
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)  # fmt: skip
_LOCAL_NAMES = (".localhost", ".local", ".internal")
_METHODS = "GET, POST, PUT, DELETE, HEAD, OPTIONS"


class Origins:
    """Which pages may call the daemon: the defaults and [server] origins (`*` matches anything).

    A browser sends Origin with a page's cross-origin request. Without this check any web page
    could make the daemon pull a file, create a model or run a generation: a "simple" POST
    (text/plain) needs no preflight, and every route takes any Content-Type. Clients that are
    not browsers send no Origin and are not concerned.
    """

    def __init__(self, config: ServerConfig):
        self.config = config  # read at each request, so that a reload applies at once
        self._compiled: tuple[list[str] | None, re.Pattern] = (None, re.compile(""))

    def allows(self, origin: str) -> bool:
        if self._compiled[0] != self.config.origins:
            patterns = (re.escape(pattern).replace(r"\*", ".*") for pattern in (*DEFAULT_ORIGINS, *self.config.origins))
            self._compiled = (list(self.config.origins), re.compile("|".join(patterns), re.IGNORECASE))
        return self._compiled[1].fullmatch(origin) is not None

    def refusal(self, request: Request) -> Response | None:
        """A 403 for a page of an origin not allowed, or for a Host that is not this machine's on a
        loopback listener (a rebound name: the page's own origin, so CORS would let it read)."""
        host = request.headers.get("host", "")
        if request.loopback and not _local_host(host):
            return error_response(403, f"Host {host[:80]!r} is not a name of this machine, and this listener is "
                                       "loopback only (DNS rebinding); a proxy must send Host: localhost")  # fmt: skip
        origin = request.headers.get("origin")
        if origin is not None and not self.allows(origin):
            return error_response(403, f"origin {origin[:80]!r} may not call this daemon; "
                                       "add it to [server] origins")  # fmt: skip
        return None

    @staticmethod
    def preflight(request: Request) -> Response | None:
        """The answer to a browser's preflight (OPTIONS with Access-Control-Request-Method) from an
        allowed origin; None for any other request."""
        if request.method != "OPTIONS" or "access-control-request-method" not in request.headers:
            return None
        headers = [("access-control-allow-methods", _METHODS), ("access-control-max-age", "7200")]
        if asked := request.headers.get("access-control-request-headers"):
            headers.append(("access-control-allow-headers", asked))
        return Response(204, headers=headers)

    def stamp(self, request: Request, response: Response | StreamingResponse) -> Response | StreamingResponse:
        """The response, readable by the page that asked for it if its origin is allowed."""
        if (origin := request.headers.get("origin")) is not None and self.allows(origin):
            response.headers = [*response.headers, ("access-control-allow-origin", origin), ("vary", "Origin")]
        return response


def _local_host(host: str) -> bool:
    """Whether a Host header names this machine: an address (no name to rebind), a name of one
    label (no public DNS name has one; localhost, the host name), or a local-only name."""
    name = host.rpartition(":")[0] if re.fullmatch(r".*:[0-9]*", host) and not host.endswith("]") else host
    name = name.strip("[]").lower().removesuffix(".")  # `localhost.`: the same name, fully qualified
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return "." not in name or name.endswith(_LOCAL_NAMES) or name in _own_names()


@functools.cache
def _own_names() -> frozenset[str]:
    # Debian maps the host's full name to 127.0.1.1: a loopback address, reached by that name.
    # Looked up once, and only for a dotted name that is not local-only (getfqdn may ask DNS).
    return frozenset({socket.gethostname().lower(), socket.getfqdn().lower()})
