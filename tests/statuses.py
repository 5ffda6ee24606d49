"""What no gRPC status detail may show a client: the server's insides."""

from __future__ import annotations

import re

LEAKS = {
    "a traceback": re.compile(r"Traceback|File \"|line \d+, in "),
    "a terminal escape": re.compile(r"\x1b\["),
    "an IP address": re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
    "a pid": re.compile(r"\bpid[=: ]", re.IGNORECASE),
    "an actor or node id": re.compile(r"\b[0-9a-f]{24,}\b|actor_id|ActorID|node_id", re.IGNORECASE),
    "an exception's repr": re.compile(r"\w+(?:Error|Exception)\("),
}


def leaks(details: str) -> list[str]:
    """The kinds of server insides that a status detail shows (empty: it is clean)."""
    return [what for what, pattern in LEAKS.items() if pattern.search(details or "")]
