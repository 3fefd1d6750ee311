"""mlssp_jax: multi-task segmentation and AVM classification of intracerebral hemorrhage.

A JAX/Flax reimplementation of MLSSP (ZHAO Kai et al., 2022). Arrays are channels-last,
``(B, D, H, W, C)``, everywhere in the package.
"""

__version__ = "0.1.0"
