"""finetune: personalise text-to-image diffusion models from typed YAML recipes.

Importing the package is cheap on purpose: nothing heavy (torch, diffusers) is imported until a
recipe has been validated, so a bad recipe is rejected in well under two seconds.
"""

__version__ = "0.1.0"
