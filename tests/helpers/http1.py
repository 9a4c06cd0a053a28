"""A raw HTTP/1.1 client for the tests that look at the wire: chunked bodies, closed connections."""

from __future__ import annotations

import socket

LAST_CHUNK = b"\r\n0\r\n\r\n"


def open_stream(url: str, path: str, *, rcvbuf: int = 0, timeout: float = 10) -> socket.socket:
    """A connection that sent ``GET path``; ``rcvbuf`` shrinks its receive buffer first."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def read_until(sock: socket.socket, data: bytes, marker: bytes) -> bytes:
    """Read on until ``marker`` is in what came (``data`` is what came before)."""
    buf, start = bytearray(data), 0
    while buf.find(marker, start) < 0:
        start = max(0, len(buf) - len(marker) + 1)
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before {marker!r}"
        buf += chunk
    return bytes(buf)


def read_chunked(
    sock: socket.socket, raw: bytes = b"", *, head: bool = True
) -> tuple[bytes, bytes]:
    """Read a chunked body to its last chunk (``raw`` is what came already): the response's head
    (none if ``head`` is False: the bytes are only chunks) and the dechunked body."""
    buf = bytearray(raw)
    while True:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before the end of the body"
        buf += chunk
        if buf.endswith(LAST_CHUNK):
            top, _, body = bytes(buf).partition(b"\r\n\r\n") if head else (b"", b"", bytes(buf))
            try:
                return top, dechunk(body)
            except ValueError:
                continue  # "0\r\n\r\n" inside an event; the body goes on


def read_response(sock: socket.socket, raw: bytes = b"") -> tuple[bytes, bytes, bool]:
    """The head and the dechunked body of a chunked response read to its last chunk (``raw``
    is what came already), and whether the server then closed the connection."""
    head, payload = read_chunked(sock, raw)
    assert head.startswith(b"HTTP/1.1 200"), head
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        closed = False
    return head, payload, closed


def dechunk(body: bytes) -> bytes:
    """Undo HTTP/1.1 chunked framing by the rules (a stray or missing byte breaks the sizes);
    ValueError if ``body`` does not end with the last chunk."""
    parts: list[bytes] = []
    at = 0
    while True:
        eol = body.find(b"\r\n", at)
        if eol < 0:
            raise ValueError("no last chunk")
        length = int(body[at:eol], 16)
        if not length:
            if body[eol:] != b"\r\n\r\n":
                raise ValueError("bytes after the last chunk")
            return b"".join(parts)
        if body[eol + 2 + length : eol + 4 + length] != b"\r\n":
            raise ValueError(f"a chunk of {length} bytes not followed by CRLF")
        parts.append(body[eol + 2 : eol + 2 + length])
        at = eol + 4 + length
