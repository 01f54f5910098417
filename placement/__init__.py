"""The placement planner: what runs where for a model on a machine, and how fast it will be.

Reads only a checkpoint's config.json and the machine's inventory; imports no torch at module
level and nothing of the `hybrid` runtime, which reads the Profile this package writes.
"""

from placement.hardware import Hardware, describe, detect, resolve
from placement.model_config import ConfigError
from placement.model_spec import Arch, ModelSpec
from placement.planner import PlanError, Request, Stats, plan
from placement.profile import Problem, Profile, ProfileError

__all__ = ["Arch", "ConfigError", "Hardware", "ModelSpec", "PlanError", "Problem", "Profile", "ProfileError",
           "Request", "Stats", "describe", "detect", "plan", "resolve"]
