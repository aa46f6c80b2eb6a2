"""timm-ldn: Linear Diffusion Networks as timm models.

Importing the package registers ``ldn_*`` in timm's model registry.
"""
from .ldn import LinearDiffusionNet, ldn_base, ldn_small, ldn_tiny

__version__ = '0.2.0'
