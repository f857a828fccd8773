"""Small facts about network addresses, shared by the server and the clients; the server's listening sockets."""

from __future__ import annotations

import errno
import ipaddress
import socket

import httpx
import psutil

from memserve.errors import InvalidArgument


def normalize_base_url(url: str) -> str:
    """``http://host:8123`` and ``http://host:8123/v1/`` both become ``http://host:8123/v1``."""
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidArgument(f"{url!r} is not a URL ({exc}); expected e.g. http://127.0.0.1:8000") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidArgument(f"{url!r} is not an http(s) URL; expected e.g. http://127.0.0.1:8000")
    base = str(parsed).rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; anything else is reached over a network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_sockets(host: str, port: int, *, backlog: int = 2048) -> list[socket.socket]:
    """Bound, listening TCP sockets for ``host:port``, one per address it resolves to (``localhost``: 127.0.0.1
    and ::1), made as asyncio's ``create_server`` makes them; OSError (``socket.gaierror`` included) if any
    cannot be had, with none left open.

    The server binds these before it loads anything and hands them to uvicorn, so a port that is taken is
    found at once, and no other process can take it between a check and the bind. With port 0 every address
    gets the same free port.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            # proto=IPPROTO_TCP, as getaddrinfo gives it: asyncio sets TCP_NODELAY only on such sockets
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart is not blocked by TIME_WAIT
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # each family has its own socket
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_error_message(host: str, port: int, exc: OSError) -> str:
    """Why ``host:port`` cannot be listened on, and what to do, in one line."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot listen on {where}: {host!r} is not a name or address of this machine ({exc.strerror}); "
            "pass --host 127.0.0.1 (or 0.0.0.0 for every interface)"
        )
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is in use{_holder(port)}; stop that server or pass --port "
            "with a free port (--port 0 picks one)"
        )
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges); pass --port "
            "8000 or another port above 1023"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: {host} is not an address of this machine; pass --host 127.0.0.1 "
            "(or 0.0.0.0 for every interface)"
        )
    return f"cannot listen on {where}: {exc.strerror or exc}; check --host and --port"


def _holder(port: int) -> str:
    """`` (by pid N: command)`` when this user may see which process listens on ``port``; else nothing."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                command = " ".join(" ".join(psutil.Process(conn.pid).cmdline()).split())  # one line
                return f" (by pid {conn.pid}: {command[:120]})"
    except (psutil.Error, OSError):  # a courtesy: the message stands without it
        return ""
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, for another process (a server, an engine) to bind.

    Another process could take it first: then that server fails to start and says so in its log, which the
    load's error quotes.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
