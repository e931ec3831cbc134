"""LoRA adapters that ship with the course, how they are built, and how to look inside one (notebook 01).

``adapter_path(name)`` is the folder of a shipped adapter (``"addition"``,
``"pirate"``), ready for ``PeftModel.from_pretrained``. ``build_all`` retrains
them from ``RECIPES`` (``python -m course adapters build``). ``delta_weight`` and
``lora_parameter_count`` are the reference answers of the chapter's exercises.
"""

from course.adapters.anatomy import delta_weight, lora_parameter_count
from course.adapters.build import ADAPTERS_DIR, adapter_path, build, build_all
from course.adapters.recipes import RECIPES, Recipe, pirate, sounds_like_a_pirate

__all__ = [
    "ADAPTERS_DIR",
    "RECIPES",
    "Recipe",
    "adapter_path",
    "build",
    "build_all",
    "delta_weight",
    "lora_parameter_count",
    "pirate",
    "sounds_like_a_pirate",
]
