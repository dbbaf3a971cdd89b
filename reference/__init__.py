"""An independent reference preparer for LoRA / QLoRA training.

It implements upstream's documented and observed preparation semantics per
version range (a :class:`~reference.profiles.Profile`), imports torch,
transformers and bitsandbytes only, and never peft or trl.
"""

from reference.errors import PreparationError, builtin_class
from reference.prepare import prepare
from reference.profiles import PROFILES, Profile, installed_versions, select_profile
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

__all__ = [
    "ABSENT",
    "PROFILES",
    "AdapterSpec",
    "Case",
    "ModelSpec",
    "PreparationError",
    "Profile",
    "QuantSpec",
    "TrainingSpec",
    "builtin_class",
    "installed_versions",
    "prepare",
    "select_profile",
]
