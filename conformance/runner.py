"""Prepare one case on both sides and compare: the differential step.

``run_case`` builds (or loads) the model twice, prepares one copy with the
reference and one with upstream, reduces both to snapshots, and diffs them.
Known divergences are matched against the registry; anything left over is an
unexpected divergence.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance import upstream
from conformance.diff import Divergence, diff
from conformance.known import Registry, default_registry
from conformance.models import checkpoint_path, load_model
from conformance.snapshot import Snapshot, error_snapshot, snapshot_of
from reference import PreparationError, Profile, builtin_class, prepare
from reference.notices import PreparationWarning
from reference.trl import prepare_trl, select_trl_flow
from reference.spec import Case

__all__ = ["Outcome", "cache_dir", "replay_command", "run_case"]


@dataclass
class Outcome:
    """The result of one differential example."""

    case: Case
    status: str
    """``agree``, ``diverge``, ``known`` or ``skip``."""
    reference: Snapshot | None = None
    upstream: Snapshot | None = None
    divergences: list[Divergence] = field(default_factory=list)
    """Unexpected divergences (those no registry entry explains)."""
    known: list[str] = field(default_factory=list)
    """Ids of the registry entries that explained divergences."""
    reason: str = ""
    """Why the case was skipped."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.case.model.model_type,
            "task": self.case.model.task,
            "quantization": self.case.quant.kind,
            "load_dtype": self.case.model.load_dtype,
            "level": self.case.training.level,
            "invalid": self.case.invalid,
            "rejected": bool(self.upstream is not None and self.upstream.error is not None),
            "outcome": self.status,
            "case": self.case.to_json(),
        }
        for side, snap in (("reference", self.reference), ("upstream", self.upstream)):
            if snap is not None and snap.error is not None:
                out[f"{side}_error"] = f"{snap.error.cls}[{snap.error.kind}]"
        if self.divergences:
            kinds = {m.path: m.kind for snap in (self.reference, self.upstream) if snap is not None for m in snap.lora}
            out["divergences"] = [
                {**d.to_json(), **({"module_kind": kinds[d.path]} if d.path in kinds else {})}
                for d in self.divergences
            ]
        if self.known:
            out["known"] = list(self.known)
        if self.reason:
            out["reason"] = self.reason
        return out


def cache_dir() -> Path:
    """Where quantized loads find their checkpoints (``CONFORMANCE_CACHE`` overrides)."""
    path = Path(os.environ.get("CONFORMANCE_CACHE") or Path(tempfile.gettempdir()) / "lora-conformance-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _reference_side(case: Case, profile: Profile) -> Snapshot:
    # At the trl level with a path, the trainer loads the checkpoint through transformers;
    # the reference's model comes from the same checkpoint (load_model), so both start equal.
    model = load_model(case.model, case.quant, cache_dir(), device=case.training.device)
    trainer_gc = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.training.level == "trl":
                result = prepare_trl(model, case.adapter, case.training, profile, select_trl_flow())
                prepared, trainer_gc = result.model, result.trainer_gradient_checkpointing
            else:
                prepared = prepare(model, case.adapter, case.training, profile)
        except PreparationError as exc:
            return error_snapshot(builtin_class(exc), exc.kind, str(exc))
    kinds = [w.message.kind for w in caught if isinstance(w.message, PreparationWarning)]
    return snapshot_of(prepared, kinds, trainer_gc)


def _upstream_side(case: Case, raw_warnings: list[str] | None = None) -> Snapshot:
    """Upstream's snapshot of ``case``; peft's and trl's own warning messages are appended
    to ``raw_warnings`` when given (the regression gate compares them verbatim)."""
    t = case.training
    if t.level == "trl" and t.model_from_path:
        model = str(checkpoint_path(case.model, cache_dir()))
    else:
        model = load_model(case.model, case.quant, cache_dir(), device=t.device)
    trainer_gc = None
    logged: list[str] = []
    with warnings.catch_warnings(record=True) as caught, upstream.own_log_records(logged):
        warnings.simplefilter("always")
        try:
            if t.level == "trl":
                prepared, trainer_gc, mutations = upstream.prepare_trl(model, case)
            else:
                prepared, mutations = upstream.prepare_peft(model, case)
        except Exception as exc:  # noqa: BLE001 - every upstream rejection is an outcome to compare
            cls, kind = upstream.classify_error(exc)
            return error_snapshot(cls, kind, f"{type(exc).__name__}: {exc}")
    kinds = [k for w in caught if (k := upstream.classify_warning(str(w.message))) is not None]
    if raw_warnings is not None:
        raw_warnings.extend(sorted(set(upstream.own_warnings(caught)) | set(logged)))
    return dataclasses.replace(snapshot_of(prepared, kinds, trainer_gc), config_mutations=mutations)


def run_case(case: Case, profile: Profile, registry: Registry | None = None) -> Outcome:
    """Prepare ``case`` on both sides and classify the result."""
    registry = registry if registry is not None else default_registry()
    up = _upstream_side(case)
    ref = _reference_side(case, profile)
    found = diff(ref, up)
    if not found:
        return Outcome(case, "agree", ref, up)
    unexplained, known = registry.explain(case, found)
    if unexplained:
        return Outcome(case, "diverge", ref, up, unexplained, known)
    return Outcome(case, "known", ref, up, [], known)


def replay_command(case: Case, profile: Profile) -> str:
    """A one-line shell command that replays exactly ``case``."""
    payload = case.dumps().replace("'", "'\"'\"'")
    return f"python -m conformance explain --profile {profile.name} --case '{payload}'"
