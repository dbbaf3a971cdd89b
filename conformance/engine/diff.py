"""Field-by-field differences between two snapshots.

``diff(reference, upstream)`` returns :class:`Divergence` records keyed by a
path (a parameter, a buffer, a LoRA module, a modules-to-save wrapper, ``<model>``,
``<peft>`` or ``<error>``) and a field name.  Nested per-adapter fields are spelled
``adapter[default].scaling``.  Collections are compared one item at a time, so that a
known-divergence entry can excuse exactly one item: one divergence per warning kind
(``warnings.<kind>``), per mutated config field (``config_mutations.<field>``), per
``model.config`` key written (``config_writes.<key>``), per hooked module (``hooks.<path>``), per stored adapter-config field
(``adapter_config.<field>``).  When both sides raise, their ``Class[kind]`` is compared
as one field, ``error``; when one side raises, the field is ``raised``.  The list is
sorted, so two runs of the same case print the same diff.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from conformance.engine.facts import OPTIONAL_CONFIG_KEYS
from conformance.engine.snapshot import Snapshot

__all__ = ["ERROR", "MODEL", "PEFT", "Divergence", "diff", "error_label", "format_table"]

MODEL = "<model>"
PEFT = "<peft>"
ERROR = "<error>"
_ITEMISED = ("config_writes",)
"""ModelFacts fields holding (key, value) pairs, compared key by key."""


@dataclass(frozen=True)
class Divergence:
    """One field where the reference and upstream disagree."""

    path: str
    field: str
    reference: Any
    upstream: Any

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "field": self.field, "reference": _plain(self.reference), "upstream": _plain(self.upstream)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.astuple(value))
    return value


def _fields(obj: Any, skip: tuple[str, ...] = ("path",)) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in skip}


def _compare_keyed(kind: str, ref: Iterable[Any], up: Iterable[Any], out: list[Divergence]) -> None:
    ref_by = {x.path: x for x in ref}
    up_by = {x.path: x for x in up}
    for path in sorted(ref_by.keys() | up_by.keys()):
        r, u = ref_by.get(path), up_by.get(path)
        if r is None or u is None:
            out.append(Divergence(path, f"{kind}.present", r is not None, u is not None))
            continue
        rf, uf = _fields(r), _fields(u)
        for name in rf:
            if name == "adapters" and kind == "lora":
                _compare_adapters(path, dict(rf[name]), dict(uf[name]), out)
            elif rf[name] != uf[name]:
                out.append(Divergence(path, name, rf[name], uf[name]))


def _compare_adapters(path: str, ref: dict[str, Any], up: dict[str, Any], out: list[Divergence]) -> None:
    for name in sorted(ref.keys() | up.keys()):
        r, u = ref.get(name), up.get(name)
        if r is None or u is None:
            out.append(Divergence(path, f"adapter[{name}].present", r is not None, u is not None))
            continue
        for field_name, value in _fields(r, skip=()).items():
            other = getattr(u, field_name)
            if value != other:
                out.append(Divergence(path, f"adapter[{name}].{field_name}", value, other))


def error_label(error: Any) -> str:
    """``Class[kind]`` of an error snapshot (what the two sides' errors are compared on)."""
    return f"{error.cls}[{error.kind}]"


def _by_path(hooks: Iterable[tuple[str, str, str]]) -> list[tuple[str, tuple]]:
    """(path, ((kind, function), ...)) per hooked module."""
    grouped: dict[str, list] = {}
    for path, kind, fn in hooks:
        grouped.setdefault(path, []).append((kind, fn))
    return [(path, tuple(sorted(items))) for path, items in grouped.items()]


def _compare_sets(path: str, name: str, ref: Iterable[str], up: Iterable[str], out: list[Divergence]) -> None:
    """One divergence per item present on one side only: ``<name>.<item>`` present True / False."""
    ref, up = set(ref), set(up)
    for item in sorted(ref ^ up):
        out.append(Divergence(path, f"{name}.{item}", item in ref, item in up))


def _compare_pairs(path: str, name: str, ref: Iterable[tuple[str, Any]], up: Iterable[tuple[str, Any]],
                   out: list[Divergence], optional: frozenset[str] = frozenset()) -> None:
    """One divergence per key whose value differs (``<absent>`` on the side that lacks it); a key
    in ``optional`` is compared only when both sides have it."""
    ref_by, up_by = dict(ref), dict(up)
    for key in sorted(ref_by.keys() | up_by.keys()):
        if key in optional and not (key in ref_by and key in up_by):
            continue
        r, u = ref_by.get(key, "<absent>"), up_by.get(key, "<absent>")
        if r != u:
            out.append(Divergence(path, f"{name}.{key}", r, u))


def diff(reference: Snapshot, upstream: Snapshot) -> list[Divergence]:
    """Every field in which ``reference`` and ``upstream`` differ."""
    out: list[Divergence] = []
    if reference.error is not None or upstream.error is not None:
        r, u = reference.error, upstream.error
        if r is None or u is None:
            out.append(Divergence(ERROR, "raised", _describe(r), _describe(u)))
        elif error_label(r) != error_label(u):
            out.append(Divergence(ERROR, "error", error_label(r), error_label(u)))
        return out
    _compare_keyed("param", reference.params, upstream.params, out)
    _compare_keyed("buffer", reference.buffers, upstream.buffers, out)
    _compare_keyed("lora", reference.lora, upstream.lora, out)
    _compare_keyed("saved", reference.saved, upstream.saved, out)
    _compare_keyed("tokens", reference.tokens, upstream.tokens, out)
    _compare_sets(MODEL, "warnings", reference.warnings, upstream.warnings, out)
    _compare_sets(MODEL, "config_mutations", reference.config_mutations, upstream.config_mutations, out)
    if reference.model is not None and upstream.model is not None:
        for name, value in _fields(reference.model, skip=()).items():
            other = getattr(upstream.model, name)
            if name in _ITEMISED:
                _compare_pairs(MODEL, name, value, other, out)
            elif name == "shared_storage":  # per group of tied tensors
                _compare_sets(MODEL, name, value, other, out)
            elif name == "hooks":  # per module: an entry can excuse the hooks of one module
                _compare_pairs(MODEL, name, _by_path(value), _by_path(other), out)
            elif value != other:
                out.append(Divergence(MODEL, name, value, other))
    r, u = reference.peft, upstream.peft
    if (r is None) != (u is None):
        out.append(Divergence(PEFT, "present", r is not None, u is not None))
    elif r is not None and u is not None:
        if r.wrapper != u.wrapper:
            out.append(Divergence(PEFT, "wrapper", r.wrapper, u.wrapper))
        if r.active_adapters != u.active_adapters:
            out.append(Divergence(PEFT, "active_adapters", r.active_adapters, u.active_adapters))
        _compare_pairs(PEFT, "adapter_config", r.adapter_config, u.adapter_config, out, OPTIONAL_CONFIG_KEYS)
    return out


def _describe(error: Any) -> str:
    if error is None:
        return "no error"
    return f"{error_label(error)}: {error.message[:160]}"


def format_table(divergences: list[Divergence], limit: int = 40) -> str:
    """A side-by-side table: path | field | reference | upstream."""
    rows = [("path", "field", "reference", "upstream")]
    rows += [(d.path, d.field, repr(d.reference), repr(d.upstream)) for d in divergences[:limit]]
    widths = [min(60, max(len(row[i]) for row in rows)) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell[: widths[j]].ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if len(divergences) > limit:
        lines.append(f"... and {len(divergences) - limit} more")
    return "\n".join(lines)
