"""The client's one exception tree (drawn in the package docstring): no OSError or httptools error leaves it."""

from __future__ import annotations


class HTTPError(Exception):
    """Every failure of this client; the subclasses below are drawn as a tree in the module docstring."""


class ConnectError(HTTPError): ...


class ConnectTimeout(HTTPError, TimeoutError): ...


class ReadTimeout(HTTPError, TimeoutError): ...


class ConnectionBroken(HTTPError): ...


class ProtocolError(HTTPError): ...
