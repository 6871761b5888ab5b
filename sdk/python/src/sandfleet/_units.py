"""Quantities and durations as people write them, read the way the CLI reads them.

Memory: ``268435456``, ``"256Mi"``, ``"1Gi"``, ``"512M"``, ``"64Ki"``, ``"100k"``.
CPU: ``0.5``, ``2``, ``"500m"`` (millicores), ``"1.5"``.
Durations: seconds as a number, a :class:`datetime.timedelta`, or ``"30s"``,
``"5m"``, ``"1h30m"``, ``"250ms"``, ``"2d"``.
"""

from __future__ import annotations

import datetime
import math
import re

from .errors import InvalidArgument

#: A memory or disk size: bytes, or a quantity such as ``"512Mi"``.
Memory = int | str
#: CPU: cores (``0.5``) or a quantity such as ``"500m"``.
Cpu = int | float | str
#: A duration: seconds, a ``timedelta``, or text such as ``"1h"``.
Duration = int | float | str | datetime.timedelta

_MEMORY_UNITS = {
    "": 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}

_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1


def parse_memory(value: Memory, what: str = "memory") -> int:
    """Bytes from ``value``: an int, or a Kubernetes-style quantity (``"512Mi"``)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid {what} quantity {value!r}: expected bytes or a quantity such as 512Mi")
    if isinstance(value, int):
        if value < 0 or value > _U64_MAX:
            raise InvalidArgument(f"invalid {what} quantity {value!r}: out of range")
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"invalid {what} quantity {value!r}: expected bytes or a quantity such as 512Mi")
    text = value.strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]*)([A-Za-z]*)", text)
    if not m or not m.group(1) or m.group(1) == ".":
        raise InvalidArgument(f"invalid {what} quantity {value!r}: expected a number, e.g. 256Mi")
    number, unit = m.groups()
    if unit not in _MEMORY_UNITS:
        raise InvalidArgument(f"invalid {what} quantity {value!r}: unknown unit; use Ki, Mi, Gi, Ti, k, M, G or T")
    amount = float(number) * _MEMORY_UNITS[unit]
    if not math.isfinite(amount) or amount < 0 or amount > _U64_MAX:
        raise InvalidArgument(f"invalid {what} quantity {value!r}: out of range")
    return round(amount)


def parse_cpu(value: Cpu, what: str = "cpu") -> int:
    """Millicores from ``value``: cores as a number (``0.5``) or text (``"500m"``, ``"2"``)."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid {what} quantity {value!r}: expected cores (0.5) or millicores (500m)")
    if isinstance(value, (int, float)):
        millis = float(value) * 1000.0
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith("m"):
            if not text[:-1].isdigit():
                raise InvalidArgument(f"invalid {what} quantity {value!r}: expected whole millicores, e.g. 500m")
            millis = float(int(text[:-1]))
        else:
            try:
                millis = float(text) * 1000.0
            except ValueError:
                raise InvalidArgument(
                    f"invalid {what} quantity {value!r}: expected cores, e.g. 0.5, or millicores, e.g. 500m"
                ) from None
    else:
        raise InvalidArgument(f"invalid {what} quantity {value!r}: expected cores (0.5) or millicores (500m)")
    if not math.isfinite(millis) or millis < 0 or millis > _U32_MAX:
        raise InvalidArgument(f"invalid {what} quantity {value!r}: out of range")
    return round(millis)


_DURATION_UNITS = {
    "ms": 0.001,
    "msec": 0.001,
    "millis": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
}


def parse_duration(value: Duration, what: str = "duration") -> float:
    """Seconds from ``value``: a number of seconds, a ``timedelta``, or ``"1h30m"``-style text."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid {what} {value!r}: expected seconds or text such as 30s, 5m, 1h")
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        seconds = _parse_duration_text(text, value, what)
    else:
        raise InvalidArgument(f"invalid {what} {value!r}: expected seconds or text such as 30s, 5m, 1h")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgument(f"invalid {what} {value!r}: must be a finite, non-negative duration")
    return seconds


def _parse_duration_text(text: str, value: str, what: str) -> float:
    if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", text):
        return float(text)
    parts = re.findall(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text):
        raise InvalidArgument(f"invalid {what} {value!r}: expected e.g. 30s, 5m, 1h, 1h30m, 250ms")
    seconds = 0.0
    for number, unit in parts:
        if unit not in _DURATION_UNITS:
            raise InvalidArgument(f"invalid {what} {value!r}: unknown unit {unit!r}; use ms, s, m, h, d or w")
        seconds += float(number) * _DURATION_UNITS[unit]
    return seconds


def ceil_seconds(value: Duration, what: str) -> int:
    """Whole seconds, rounded up (so a 500 ms ttl is 1 s, not the server default)."""
    return math.ceil(parse_duration(value, what))


def millis(value: Duration, what: str) -> int:
    """Whole milliseconds, rounded up, at least 1."""
    return max(1, math.ceil(parse_duration(value, what) * 1000.0))
