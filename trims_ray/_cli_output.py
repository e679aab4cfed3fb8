"""What the ``trims-ray`` command prints: byte sizes, tables, the JSON documents of its read
commands, and the push's progress (drawn by tqdm).

Plain functions of plain data, with no Ray and no trims_ray state, so that ``cli`` and
``_cli_commands`` hold only the commands and every shape printed is unit-tested here.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from collections.abc import Iterable, Mapping
from typing import TextIO

__all__ = [
    "PROGRESS_MIN_BYTES",
    "UploadProgress",
    "format_bytes",
    "format_table",
    "parse_bytes",
    "hit_ratio",
    "residency_json",
    "residency_rows",
    "residency_summary",
    "dump_json",
    "short_node",
]

# Uploads smaller than this finish before a bar would tell anything (auto mode only).
PROGRESS_MIN_BYTES = 32 * 1024 * 1024
# How many hex digits of a node id or a sha256 a table shows (JSON shows them whole).
SHORT = 12


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: "512 B", "1.5 KiB", "64.0 MiB", "1.2 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """A byte count as a person writes it: "1073741824", "512MiB", "1.5 GiB", "20GB" (KiB, MiB,
    GiB, TiB: powers of 1024; KB, MB, GB, TB or K, M, G, T: of 1000; case ignored).

    Raises:
        ValueError: not such a count, or a fraction of a byte.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a byte count: write it as 123, 512MiB, 1.5GiB or 20GB")
    number = Fraction(match.group(1)) * _UNITS[unit]  # exact: 8.03GB is 8030000000 bytes
    if number.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(number)


def format_table(headers: list[str], rows: list[list[object]], *, align: str) -> str:
    """A compact table: columns two spaces apart, ``align`` "l" or "r" per column."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def short_node(node_id: str) -> str:
    return node_id[:SHORT]


def hit_ratio(tier: Mapping[str, int]) -> float | None:
    """hits / (hits + misses) of a tier's counters; None before its first access."""
    accesses = tier["hits"] + tier["misses"]
    return tier["hits"] / accesses if accesses else None


def dump_json(document: object) -> str:
    """The one JSON spelling of every read command: indented, keys sorted (diffable)."""
    return json.dumps(document, indent=2, sort_keys=True)


# -- residency ---------------------------------------------------------------------------------


def residency_json(models: Iterable[object], where: Mapping[str, Mapping[str, Iterable[str]]]) -> list[dict]:
    """The ``models`` list of ``ls`` and ``status --format json``: one entry per model, with the
    copies placement knows of.

    Args:
        models: ``ModelInfo``-like objects (``name``, ``tenant``, ``sha256``, ``nbytes``), the
            caller's own and public models only: nothing else is looked up in ``where``.
        where: cache key (``<tenant>/<sha256>``) -> {node id: tiers there, best first}, as
            ``_cluster.residency`` returns it.

    Returns:
        ``[{"name", "tenant", "sha256", "nbytes", "resident": [{"node", "tier", "nbytes"}]}]``,
        sorted by tenant and name; ``resident`` sorted by node, then tier, best first.
    """
    out = []
    for info in sorted(models, key=lambda m: (m.tenant, m.name)):
        per_node = where.get(f"{info.tenant}/{info.sha256}", {})
        resident = [
            {"node": node, "tier": tier, "nbytes": info.nbytes}
            for node in sorted(per_node)
            for tier in per_node[node]
        ]
        out.append(
            {"name": info.name, "tenant": info.tenant, "sha256": info.sha256, "nbytes": info.nbytes, "resident": resident}
        )
    return out


def residency_rows(models: list[dict], *, registered: bool) -> tuple[list[str], list[list[object]], str]:
    """``residency_json``'s entries as a table: (headers, rows, align). One row per node that
    holds a model, its tiers there joined by "+" ("gpu+host"); the model's own columns only on
    its first row. ``registered``: also one row ("-") per model resident nowhere (``ls``)."""
    headers = ["MODEL", "OWNER", "SIZE", "SHA256", "NODE", "TIERS"]
    rows: list[list[object]] = []
    for model in models:
        per_node: dict[str, list[str]] = {}
        for copy in model["resident"]:
            per_node.setdefault(copy["node"], []).append(copy["tier"])
        if not per_node and not registered:
            continue
        first = [model["name"], model["tenant"], format_bytes(model["nbytes"]), model["sha256"][:SHORT]]
        places = [[short_node(n), "+".join(t)] for n, t in per_node.items()] or [["-", "-"]]
        rows.append(first + places[0])
        rows += [["", "", "", ""] + place for place in places[1:]]
    return headers, rows, "llrlll"


def residency_summary(models: list[dict]) -> str:
    """One line under the table: models, copies and the bytes they hold."""
    copies = [c for m in models for c in m["resident"]]
    resident = sum(1 for m in models if m["resident"])
    return (
        f"{len(models)} model(s), {resident} resident: {len(copies)} cop(ies) "
        f"holding {format_bytes(sum(c['nbytes'] for c in copies))}"
    )


# -- progress ------------------------------------------------------------------------------------


class UploadProgress:
    """``ModelStore.register(progress=...)``'s hook, drawn as a tqdm bar on ``stream``.

    Args:
        label: what is being done, shown before the bar.
        stream: where to draw (stderr).
        enabled: True always, False never, None for uploads of at least ``min_bytes`` when
            ``stream`` is a terminal.
        min_bytes: the size from which the bar shows in auto mode.

    Without tqdm installed, an explicitly asked for bar is replaced by one note on ``stream``.
    """

    def __init__(
        self, label: str, stream: TextIO, *, enabled: bool | None = None, min_bytes: int = PROGRESS_MIN_BYTES
    ) -> None:
        self.label, self.stream, self.enabled, self.min_bytes = label, stream, enabled, min_bytes
        self._bar = None
        self._decided = False

    def __call__(self, done: int, total: int) -> None:
        if not self._decided:
            self._decided = True
            show = self.enabled if self.enabled is not None else total >= self.min_bytes and _is_terminal(self.stream)
            if show:
                self._bar = self._open(total)
        if self._bar is None:
            return
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def _open(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            if self.enabled:  # asked for by name: say why there is none (not an error line)
                self.stream.write("(no progress bar: tqdm is not installed here; pip install tqdm)\n")
            return None
        return tqdm(
            total=total, desc=self.label, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
            mininterval=0.1, dynamic_ncols=True, leave=True,
        )  # fmt: skip

    def close(self) -> None:
        """Ends the bar (also when the upload failed half way, so the error starts a line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
