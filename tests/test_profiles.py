"""Profile and trl-flow selection: total over the seed era on, newest-with-a-warning beyond it."""

from __future__ import annotations

import warnings

import pytest

from reference.profiles import PROFILES, peft_selection_note, select_profile
from reference.selection import selection_notes
from reference.trl import TRL_FLOWS, select_trl_flow, trl_selection_note

# Every peft and trl release from the seed era on (peft 0.15+, trl 0.19+), as published on PyPI.
PEFT_RELEASES = {
    "0.15.0": "seed", "0.15.1": "seed", "0.15.2": "seed",
    "0.16.0": "peft-0.16", "0.17.0": "peft-0.17", "0.17.1": "peft-0.17",
    "0.18.0": "peft-0.18", "0.18.1": "peft-0.18",
    "0.19.0": "peft-0.19", "0.19.1": "peft-0.19",
    "0.20.0": "peft-0.20",
    "0.21.0": "current", "0.21.1": "current", "0.21.2": "current",
}
TRL_RELEASES = {
    "0.19.0": "classic", "0.19.1": "classic", "0.20.0": "classic", "0.21.0": "classic",
    "0.22.0": "helper", "0.22.1": "helper", "0.22.2": "helper",
    "0.23.0": "helper-0.23", "0.23.1": "helper-0.23", "0.24.0": "helper-0.23",
    "0.25.0": "helper-0.25", "0.25.1": "helper-0.25",
    "0.26.0": "inline", "0.26.1": "inline", "0.26.2": "inline",
    "0.27.0": "inline-0.27", "0.27.1": "inline-0.27", "0.27.2": "inline-0.27", "0.28.0": "inline-0.27",
    "0.29.0": "inline-0.27", "0.29.1": "inline-0.27",
    "1.0.0": "inline-0.27", "1.1.0": "inline-0.27", "1.2.0": "inline-0.27", "1.3.0": "inline-0.27",
    "1.4.0": "inline-0.27", "1.5.0": "inline-0.27", "1.5.1": "inline-0.27", "1.6.0": "inline-0.27",
    "1.7.0": "inline-1.7", "1.7.1": "inline-1.7", "1.8.0": "inline-1.7", "1.9.0": "inline-1.7",
    "1.9.1": "inline-1.7", "1.9.2": "inline-1.7", "1.10.0": "inline-1.7", "1.11.0": "inline-1.7",
    "1.12.0": "inline-1.7", "1.13.0": "inline-1.7", "1.14.0": "inline-1.14", "1.14.1": "inline-1.14",
    "1.14.2": "inline-1.14",
    "1.15.0": "current", "1.16.0": "current",
}


@pytest.mark.parametrize(("version", "expected"), sorted(PEFT_RELEASES.items()))
def test_every_peft_release_selects_its_profile_silently(version, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        profile = select_profile(versions={"peft": version})
    assert profile.name == expected
    assert peft_selection_note(version) is None


@pytest.mark.parametrize(("version", "expected"), sorted(TRL_RELEASES.items()))
def test_every_trl_release_selects_its_flow_silently(version, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = select_trl_flow(version=version)
    assert flow.name == expected
    assert trl_selection_note(version) is None


def test_profile_ranges_tile_the_seed_era_without_gaps():
    """Each profile's specifier starts where the previous one ends; the last is open."""
    specs = [p.peft for p in PROFILES.values()]
    assert specs[0].startswith(">=0.15,")
    for before, after in zip(specs, specs[1:], strict=False):
        assert before.split(",<")[1] == after.split(",")[0].removeprefix(">=")
    assert "<" not in specs[-1]


def test_flow_ranges_tile_without_gaps():
    specs = [f.trl for f in TRL_FLOWS.values()]
    for before, after in zip(specs, specs[1:], strict=False):
        assert before.split(",<")[1] == after.split(",")[0].removeprefix(">=")
    assert "<" not in specs[-1]


def test_newer_peft_selects_the_newest_profile_with_a_warning():
    with pytest.warns(UserWarning, match=r"peft 0\.22\.0 is newer than the newest known profile"):
        profile = select_profile(versions={"peft": "0.22.0"})
    assert profile.name == "current"


def test_newer_trl_selects_the_newest_flow_with_a_warning():
    with pytest.warns(UserWarning, match=r"trl 1\.17\.0 is newer than the newest known trl flow"):
        flow = select_trl_flow(version="1.17.0")
    assert flow.name == "current"
    with pytest.warns(UserWarning, match="trl 2.0.0"):
        assert select_trl_flow(version="2.0.0").name == "current"


def test_selection_notes_for_the_header():
    assert selection_notes({"peft": "0.21.2", "trl": "1.16.0"}) == []
    assert selection_notes({"peft": "absent", "trl": "absent"}) == []
    notes = selection_notes({"peft": "0.23.1", "trl": "1.20.0"})
    assert len(notes) == 2
    assert notes[0].startswith("peft 0.23.1 is newer") and "'current'" in notes[0]
    assert notes[1].startswith("trl 1.20.0 is newer") and "'current'" in notes[1]


def test_dev_builds_count_as_their_release():
    assert select_profile(versions={"peft": "0.19.0.dev0"}).name == "peft-0.19"
    assert select_trl_flow(version="0.26.0.dev0").name == "inline"
    assert select_trl_flow(version="1.15.0+local").name == "current"


def test_forced_names():
    assert select_trl_flow("helper-0.23").shape == "helper"
    assert select_profile("peft-0.18").name == "peft-0.18"
    with pytest.raises(ValueError, match="trl flow='nope' is not one of classic, helper"):
        select_trl_flow("nope")


def test_flow_rules_change_where_upstream_changed():
    f = TRL_FLOWS
    assert list(f) == ["classic", "helper", "helper-0.23", "helper-0.25", "inline", "inline-0.27", "inline-1.7", "inline-1.14", "current"]
    assert [f[n].peft_model_with_config for n in f] == ["ignore"] + ["merge"] * 4 + ["reject"] * 4
    assert [f[n].gradient_checkpointing_default for n in f] == [False] + [True] * 8
    assert [f[n].kbit_step_turns_off_trainer_gc for n in f] == [False, False, True, True] + [False] * 5
    assert [f[n].kbit_step for n in f][:4] == ["peft", "peft", "peft", "norms"]  # trl 0.25: trl's own k-bit step
    assert [f[n].rejects_head_lora for n in f] == [False] * 8 + [True]
    assert [f[n].bf16_cast_skips_dora_magnitude for n in f] == [False] * 8 + [True]
    assert [f[n].syncs_router_aux_loss for n in f] == [False] * 6 + [True] * 3  # trl 1.7
    assert [f[n].mirrors_pad_token for n in f] == [False] * 7 + [True] * 2  # trl 1.14
    assert [f[n].shape for n in f] == ["classic"] + ["helper"] * 3 + ["inline"] * 5


def test_profile_rules_change_where_upstream_changed():
    p = PROFILES
    # seed, peft-0.16, peft-0.17, peft-0.18, peft-0.19, peft-0.20, current
    assert [p[n].embedding_keeps_fan_in_fan_out for n in p] == [False] * 4 + [True] * 3
    assert [p[n].adapter_dtype_follows_4bit_compute for n in p] == [False] * 4 + [True] * 3
    assert [p[n].warns_lora_bias_without_base_bias for n in p] == [False] * 3 + [True] * 4
    assert [p[n].warns_unused_patterns for n in p] == [False] * 6 + [True]
    assert ["gemma4" in p[n].default_targets for n in p] == [False] * 4 + [True] * 3
    assert ["rwkv" in p[n].default_targets for n in p] == [False] * 3 + [True] * 4
    assert ["nemotron_h" in p[n].default_targets for n in p] == [False] * 5 + [True] * 2
    assert ["orthogonal" in p[n].init_variants for n in p] == [False] * 2 + [True] * 5
    assert ["target_parameters" in p[n].features for n in p] == [False] * 2 + [True] * 5
    assert ["ensure_weight_tying" in p[n].features for n in p] == [False] * 3 + [True] * 4
    assert [p[n].moe_conversion for n in p] == [False] * 4 + [True] * 3
    lazy = [p[n].layer_index_regex.startswith(".*?") for n in p]
    assert lazy == [False] * 5 + [True, True]
