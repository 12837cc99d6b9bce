"""Who may call the listener (ALLOWED_CALLERS) and over what (TLS). No Django here: the configuration
and `sendit check` use it before Django is set up."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass

log = logging.getLogger("sendit.listener")


@dataclass(frozen=True)
class Caller:
    """One entry of ALLOWED_CALLERS: an AE title, and the addresses it may call from (any if empty)."""

    aet: str
    host: str = ""

    def admits(self, aet: str, address: str, addresses: frozenset[str]) -> bool:
        if aet != self.aet:
            return False
        return not self.host or address in addresses


def parse_callers(text: str) -> list[Caller]:
    """``"CT1, PACS@10.0.0.5, MR@mr.example.org"`` → callers; raises ValueError naming a bad entry."""
    callers: list[Caller] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        aet, _, host = item.partition("@")
        aet = aet.strip()
        if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
            raise ValueError(f"{item!r} is not an AE title (1 to 16 characters, optionally @host)")
        callers.append(Caller(aet, host.strip()))
    return callers


def addresses(host: str) -> frozenset[str]:
    """The IP addresses a host name stands for (an address stands for itself); empty if unknown."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except OSError:
        log.warning("ALLOWED_CALLERS: host %s cannot be resolved; its caller is refused until it can", host)
        return frozenset()


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext | None:
    """Server TLS from LISTEN_TLS_CERT/KEY; with LISTEN_TLS_CA every caller must show a certificate it signed."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key or None)
    if ca:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
