"""Prepare one case on both sides and compare: the differential step.

``run_case`` builds (or loads) the model twice, prepares one copy with the
reference and one with upstream, reduces both to snapshots, and diffs them; when
they agree, it hands both prepared models to the numerical checks.
Known divergences are matched against the registry; anything left over is an
unexpected divergence.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from conformance.engine import offline, upstream
from conformance.engine.diff import MODEL, Divergence, diff
from conformance.engine.known import Registry, default_registry
from conformance.engine.facts import normalise_config
from conformance.engine.models import cache_dir, checkpoint_path, load_model, pristine_model
from conformance.engine.features import CaseContext
from conformance.numerics import check_numerics
from conformance.numerics import enabled as numerics_enabled
from conformance.engine.snapshot import PeftFacts, Snapshot, error_snapshot, snapshot_of
from reference import PreparationError, Profile, builtin_class
from reference.prepare import prepare_wrapped
from reference.resume import resume
from reference.adapters import with_second_adapter
from reference.trained import template_seed, trained_seed
from reference.notices import PreparationWarning
from reference.trainer_flows import prepare_trl_level
from reference.trl import select_trl_flow
from reference.spec import Case

__all__ = ["Outcome", "cache_dir", "conformance_command", "nox_session_prefix", "replay_command", "run_case", "same_structure"]


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
    numerics: dict[str, Any] | None = None
    """The numerical checks' facts (tolerance, largest error) when they ran."""
    scope: list[str] = field(default_factory=list)
    """Ids of the active registry entries whose ``when`` held for the case (for staleness)."""
    same_structure: bool = False
    """Both sides prepared a model with the same parameters and LoRA modules: what the numerical
    checks need (the share of such examples they ran on is reported)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.case.model.model_type,
            "task": self.case.model.task,
            "quantization": self.case.quant.kind,
            "load_dtype": self.case.model.load_dtype,
            "level": self.case.training.level,
            **({"trainer": self.case.training.trainer_name} if self.case.training.level == "trl" else {}),
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
        if self.numerics is not None:
            out["numerics"] = self.numerics
        if self.scope:
            out["registry_scope"] = list(self.scope)
        out["same_structure"] = self.same_structure
        return out


def _reference_side(case: Case, profile: Profile) -> Snapshot:
    return _reference_prepared(case, profile)[0]


def _via_checkpoint(case: Case) -> bool:
    """A trl-level case whose trainer is given the checkpoint's path loads the model itself, with
    ``from_pretrained``: the reference's model and the loaded model come the same way."""
    return case.training.level == "trl" and case.training.model_from_path


def _pristine(case: Case) -> nn.Module:
    """The loaded model both sides start from (never changed): values are read against it."""
    return pristine_model(case.model, case.quant, cache_dir(), device=case.training.device,
                          via_checkpoint=_via_checkpoint(case))


def _fresh(case: Case) -> nn.Module:
    """Another load of the case's model: the one a resumed adapter was trained and saved from."""
    return load_model(case.model, case.quant, cache_dir(), device=case.training.device)


def seeded_values(case: Case) -> bool:
    """Whether every new parameter of ``case``'s prepared model holds seeded values both sides
    must agree on (``reference.trained``), so that the snapshot fingerprints them: an adapter
    loaded from a file, or a trained PeftModel handed to a trainer without a new config (the
    DPO family's ``ref`` adapter copies it)."""
    t = case.training
    return bool(t.load_saved) or (t.level == "trl" and t.peft_model_in and not t.peft_config_too)


def _reference_prepared(case: Case, profile: Profile) -> tuple[Snapshot, nn.Module | None]:
    """The reference's snapshot of ``case`` and its prepared model (None when it raised)."""
    # At the trl level with a path, the trainer loads the checkpoint through transformers;
    # the reference's model comes from the same checkpoint the same way, so both start equal.
    model = load_model(case.model, case.quant, cache_dir(), device=case.training.device,
                       via_checkpoint=_via_checkpoint(case))
    trainer_gc = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.training.level == "trl":
                result = prepare_trl_level(model, case.adapter, case.training, profile, select_trl_flow(),
                                           pad_token_id=offline.tokenizer().pad_token_id, trained_seed=trained_seed(case),
                                           template=offline.template_source(), template_seed=template_seed(case))
                prepared, trainer_gc, wrapper = result.model, result.trainer_gradient_checkpointing, result.wrapper
            elif case.training.load_saved:
                prepared, wrapper = resume(model, _fresh(case), case.adapter, case.training, profile,
                                           trained_seed(case))
            else:
                prepared, wrapper = prepare_wrapped(model, case.adapter, case.training, profile)
                if case.second_adapter is not None:
                    wrapper = with_second_adapter(prepared, wrapper, case, profile)
        except PreparationError as exc:
            return error_snapshot(builtin_class(exc), exc.kind, str(exc)), None
    kinds = [w.message.kind for w in caught if isinstance(w.message, PreparationWarning)]
    peft = PeftFacts(wrapper.wrapper, wrapper.active_adapters, normalise_config(dict(wrapper.config)))
    return snapshot_of(prepared, kinds, trainer_gc, pristine=_pristine(case), peft=peft,
                       fingerprint_new=seeded_values(case)), prepared


def _upstream_side(case: Case, raw_warnings: list[str] | None = None) -> Snapshot:
    """Upstream's snapshot of ``case``; peft's and trl's own warning messages are appended
    to ``raw_warnings`` when given (the regression gate compares them verbatim)."""
    return _upstream_prepared(case, raw_warnings)[0]


def _upstream_prepared(case: Case, raw_warnings: list[str] | None = None) -> tuple[Snapshot, nn.Module | None]:
    """:func:`_upstream_side` and the prepared model (the transformers model inside the
    PeftModel; None when preparation raised)."""
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
                prepared, trainer_gc, mutations, wrapper = upstream.prepare_trl(model, case)
            else:
                prepared, mutations, wrapper = upstream.prepare_peft(model, case,
                                                                     _fresh(case) if t.load_saved else None)
        except Exception as exc:  # noqa: BLE001 - every upstream rejection is an outcome to compare
            cls, kind = upstream.classify_error(exc)
            return error_snapshot(cls, kind, f"{type(exc).__name__}: {exc}"), None
    kinds = [k for w in caught if (k := upstream.classify_warning(str(w.message))) is not None]
    if raw_warnings is not None:
        raw_warnings.extend(sorted(set(upstream.own_warnings(caught)) | set(logged)))
    name, active, stored = upstream.wrapper_facts(wrapper)
    peft = PeftFacts(name, active, normalise_config(stored))
    snap = snapshot_of(prepared, kinds, trainer_gc, pristine=_pristine(case), peft=peft,
                       fingerprint_new=seeded_values(case))
    return dataclasses.replace(snap, config_mutations=mutations), prepared


def _drawn_residuals(case: Case) -> bool:
    """Whether an adapter of ``case`` takes ``pissa_niter_K``: its base weights hold residuals of a
    randomized SVD, whose draws differ between the sides (the sides are not seeded alike)."""
    from strategies.inits import init_variant

    adapters = (case.adapter, case.second_adapter) if case.second_adapter is not None else (case.adapter,)
    return any(init_variant(a.init_lora_weights) == "pissa_niter" for a in adapters)


def _without_residual_values(snap: Snapshot) -> Snapshot:
    """``snap`` with the fingerprints of its changed base weights blanked: their values are held
    to each side's own factors by the numerical checks (``numerics.init``) instead."""
    params = tuple(dataclasses.replace(p, value="changed") if p.path.endswith(".base_layer.weight")
                   and p.value.startswith("changed") else p for p in snap.params)
    return dataclasses.replace(snap, params=params)


def same_structure(reference: Snapshot, upstream: Snapshot) -> bool:
    """Both sides prepared a model with the same parameters (paths and shapes) and the same LoRA
    modules: the numerical checks can pair every tensor, whatever else differs."""
    if reference.model is None or upstream.model is None:
        return False
    return ({(p.path, p.shape) for p in reference.params} == {(p.path, p.shape) for p in upstream.params}
            and {m.path for m in reference.lora} == {m.path for m in upstream.lora})


def run_case(
    case: Case, profile: Profile, registry: Registry | None = None, *, numerics: bool | None = None
) -> Outcome:
    """Prepare ``case`` on both sides and classify the result.

    The snapshots are diffed and the divergences matched against the registry.  Then,
    when both sides prepared a model of the same structure (:func:`same_structure`) and
    nothing unexplained diverged, the numerical checks run on the two prepared models,
    after both snapshots are taken (so that no value was shared before they were
    recorded), known divergences or not; their failures are divergences like any other,
    explained by the registry or not.  ``numerics`` None follows
    ``--conformance-numerics`` (``conformance.numerics.enabled``).
    """
    registry = registry if registry is not None else default_registry()
    up, up_model = _upstream_prepared(case)
    ref, ref_model = _reference_prepared(case, profile)
    if _drawn_residuals(case):
        ref, up = _without_residual_values(ref), _without_residual_values(up)
    ctx = CaseContext(case, ref, up, profile)
    scope = registry.scope(ctx)
    paired = ref_model is not None and up_model is not None and same_structure(ref, up)
    found = diff(ref, up)
    unexplained, known = registry.explain(ctx, found) if found else ([], [])
    if unexplained:
        return Outcome(case, "diverge", ref, up, unexplained, known, scope=scope, same_structure=paired)
    facts = None
    wanted = numerics_enabled() if numerics is None else numerics
    if wanted and paired:
        # a private copy: a bitsandbytes forward casts its layer's bias in place (to the input dtype)
        checked = check_numerics(case, profile, ref_model, up_model,
                                 lambda: load_model(case.model, case.quant, cache_dir(), device=case.training.device,
                                                    via_checkpoint=_via_checkpoint(case)))
        # A forward raising alike on both sides is no pass: unexplained, it stays in the facts (a
        # strict-mode failure); a registry entry may explain it as a known upstream behaviour.
        raised = [Divergence(MODEL, "numerics.both_raised", r, r) for r in checked.both_raised]
        still, raised_known = registry.explain(ctx, raised) if raised else ([], [])
        checked.both_raised = [d.upstream for d in still]
        known += [k for k in raised_known if k not in known]
        more, more_known = registry.explain(ctx, checked.divergences)
        facts = checked.to_json()
        if raised_known:
            facts["both_raised_known"] = raised_known
        if len(checked.divergences) > len(more):
            facts["explained_divergences"] = len(checked.divergences) - len(more)
        known += [k for k in more_known if k not in known]
        if more:
            return Outcome(case, "diverge", ref, up, more, known, numerics=facts, scope=scope, same_structure=paired)
    return Outcome(case, "known" if known else "agree", ref, up, [], known, numerics=facts, scope=scope,
                   same_structure=paired)


def replay_command(case: Case, profile: Profile) -> str:
    """A one-line shell command that replays exactly ``case`` as it ran, on the same stack.

    The command names the environment that ran the case: under a session of noxfile.py, the
    ``cli`` session on the same stack and forks (:func:`nox_session_prefix`), since a fork's
    virtualenv is named by a hash and any other interpreter runs another peft; otherwise the
    interpreter running now, ``sys.executable`` (a bare ``python`` may lack torch, or hold
    another stack).
    """
    return f"{conformance_command()} explain --profile {profile.name} --case {shlex.quote(case.dumps())}"


def conformance_command() -> str:
    """How :func:`replay_command` starts ``python -m conformance`` in this environment."""
    return nox_session_prefix("cli") or f"{shlex.quote(sys.executable)} -m conformance"


REPLAY_ENV = ("CONFORMANCE_STACK", "CONFORMANCE_FORKS", "CONFORMANCE_NOXW")
"""What noxfile.py exports to the runs of its sessions: the stack's name, the fork options as
given (shell words), and the path of noxw.py."""


def nox_session_prefix(session: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``python3 .../noxw.py -s SESSION -- STACK [--peft-spec X] [--trl-spec Y]`` when running under
    a noxfile.py session (:data:`REPLAY_ENV` set), else None.  The fork specs are repeated verbatim:
    noxw.py runs from the repository root, as the first run did, so a relative path means the
    same, and the same specs reuse the same fork virtualenv."""
    env = os.environ if environ is None else environ
    stack = env.get("CONFORMANCE_STACK")
    if not stack:
        return None
    noxw = env.get("CONFORMANCE_NOXW") or "noxw.py"
    words = [f"python3 {shlex.quote(noxw)} -s {shlex.quote(session)} --", shlex.quote(stack), env.get("CONFORMANCE_FORKS", "")]
    return " ".join(w for w in words if w)
