"""ImageNet-1k recipes (yaml args files for timm's train.py), shipped as package data.

``python -c "import timm_ldn.recipes as r; print(r.path('ldn_small'))"`` prints the file to pass to
``train.py --config``.
"""
from pathlib import Path
from typing import Dict, List

RECIPE_DIR = Path(__file__).parent


def names() -> List[str]:
    """Model names that have a recipe, e.g. ``['ldn_base', 'ldn_small', 'ldn_tiny']``."""
    return sorted(p.stem[len('imagenet_'):] for p in RECIPE_DIR.glob('imagenet_*.yaml'))


def path(model_name: str) -> Path:
    """Path of the ImageNet recipe for ``model_name``."""
    p = RECIPE_DIR / f'imagenet_{model_name}.yaml'
    if not p.is_file():
        raise FileNotFoundError(f'No ImageNet recipe for {model_name!r}; available: {names()}')
    return p


def load(model_name: str) -> Dict:
    """The recipe as a dict of train.py argument names (dest form, e.g. ``drop_path``) to values."""
    import yaml
    with open(path(model_name)) as f:
        return yaml.safe_load(f)
