"""Method plug-ins. Importing this package registers every built-in method (configs only, no torch)."""

from finetune.methods import control_lora, controlnet, full, lora, pivotal, textual_inversion  # noqa: F401
from finetune.methods.base import Method, MethodConfig, register_method, registered_methods

__all__ = ["Method", "MethodConfig", "register_method", "registered_methods"]
