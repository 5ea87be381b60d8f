"""Untrusted text (file names, request fields) made safe to log or echo: control characters escaped, length capped.

A file named ``"a\\n2026-01-01 ERROR forged"`` or a 15 MB request field must neither forge log
lines nor flood the log. The text log formatter escapes every message (`escape_control`); values a
caller chose are also shortened where they are quoted (`untrusted`).
"""

from __future__ import annotations

__all__ = ["MAX_QUOTED_CHARS", "escape_control", "untrusted"]

MAX_QUOTED_CHARS = 200  # characters of an untrusted value kept in a log line or an error message

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators (they end a line too).
_CONTROL = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROL}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_control(text: str) -> str:
    r"""``text`` on one line: control characters written as escapes.

    >>> escape_control("a.svs\n2026-11-29 ERROR forged\x1b[31m")
    'a.svs\\n2026-11-29 ERROR forged\\x1b[31m'
    """
    return text.translate(_ESCAPES)


def untrusted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` quoted for a message or a log line: escaped, and cut to ``limit`` characters with the length said.

    >>> untrusted("/scans/a.svs")
    "'/scans/a.svs'"
    >>> untrusted("x" * 1_000_000, limit=8)
    "'xxxxxxxx'... (1000000 characters)"
    """
    text = str(value)
    shown = escape_control(text[:limit]).replace("'", "\\'")
    if len(text) <= limit:
        return f"'{shown}'"
    return f"'{shown}'... ({len(text)} characters)"
