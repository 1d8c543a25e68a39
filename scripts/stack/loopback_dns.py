"""A resolver of its own for one process, so that the end-to-end check drives the compose
stack's real DNS service discovery on loopback (scripts/stack/e2e.py uses it).

In compose, Prometheus finds the replicas by asking Docker's DNS for `proxy-1`, `proxy-2`
and `proxy-3` (a `dns_sd_configs` block of type A), and a replica whose container stops
leaves DNS. Prometheus's DNS discovery reads its name servers from /etc/resolv.conf and
asks them on port 53 directly (it ignores /etc/hosts), so to run that same block on
loopback the check needs:

- `LoopbackDns`: a small authoritative DNS server on a loopback address, port 53 (hence
  root), answering A queries for the names it is given, NXDOMAIN for the rest (as Docker's
  DNS does for a stopped container); names can be added and removed while it runs;
- `with_resolver`: a command line that runs a program in a mount namespace of its own
  where /etc/resolv.conf names that server (`unshare --mount`, hence root too). Nothing
  outside that process sees the change.
"""

from __future__ import annotations

import random
import socket
import struct
import threading

TTL_SECONDS = 1
# DNS header flags of an answer: QR (answer), AA (authoritative), RA (recursion available).
QR, AA, RA = 0x8000, 0x0400, 0x0080
NXDOMAIN = 3
TYPE_A, CLASS_IN = 1, 1


class LoopbackDns:
    """A UDP DNS server for a few names, on 127.53.x.y:53 (a random loopback address, so
    that concurrent runs do not collide)."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(50):
            address = f"127.53.{random.randint(0, 255)}.{random.randint(1, 254)}"
            try:
                self.sock.bind((address, 53))
                break
            except OSError as e:
                last = e
        else:
            raise OSError(f"no free loopback address for a DNS server on port 53 ({last}); it needs root")
        self.address = address
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self.thread.start()

    def set(self, name: str, ip: str) -> None:
        with self.lock:
            self.records[name.lower().rstrip(".")] = ip

    def remove(self, name: str) -> None:
        with self.lock:
            self.records.pop(name.lower().rstrip("."), None)

    def resolv_conf(self) -> str:
        """The /etc/resolv.conf text that makes a resolver ask this server only."""
        return f"nameserver {self.address}\noptions attempts:1 timeout:1\n"

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            answer = self._answer(query)
            if answer:
                try:
                    self.sock.sendto(answer, peer)
                except OSError:
                    pass

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, flags, qdcount = struct.unpack("!HHH", query[:6])
        if flags & QR or qdcount != 1:
            return None
        labels, i = [], 12
        while i < len(query) and query[i] != 0:
            n = query[i]
            labels.append(query[i + 1 : i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        i += 1
        if i + 4 > len(query):
            return None
        qtype, qclass = struct.unpack("!HH", query[i : i + 4])
        question = query[12 : i + 4]
        name = ".".join(labels).lower()
        with self.lock:
            ip = self.records.get(name)
        rd = flags & 0x0100
        if ip is None:
            header = struct.pack("!HHHHHH", ident, QR | AA | RA | rd | NXDOMAIN, 1, 0, 0, 0)
            return header + question
        if qtype != TYPE_A or qclass != CLASS_IN:
            # The name exists, but has no record of that type.
            return struct.pack("!HHHHHH", ident, QR | AA | RA | rd, 1, 0, 0, 0) + question
        record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_SECONDS, 4) + socket.inet_aton(ip)
        return struct.pack("!HHHHHH", ident, QR | AA | RA | rd, 1, 1, 0, 0) + question + record


def with_resolver(resolv_conf: str, argv: list[str]) -> list[str]:
    """argv, run in a mount namespace of its own where /etc/resolv.conf is the file
    `resolv_conf` (the rest of the file system is shared)."""
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, resolv_conf, *argv]
