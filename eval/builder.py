"""The one model builder of the studies and benchmarks, by name.

    build_model('ldn_v2', num_classes=10, in_chans=1)            # a Fashion-MNIST study row (eval/fmnist/study_models.py)
    build_model('vit_nano_patch4_28', num_classes=10, in_chans=1)  # a study baseline (same file, BASELINES)
    build_model('ldn_small', img_size=512, device='meta')          # any timm model, ldn_* included
    build_model('ldn_implicit', sequence=True, vocab_size=18, num_classes=10)  # a sequence-benchmark row (eval/lra/models.py)

The row tables stay beside their studies; this is the only code that turns a name into a model. The two tables
share row names (``ldn_no_k`` is an ablation in both), so the sequence rows are asked for with ``sequence=True``.
Models come back in training mode with random weights.
"""
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

import timm
from timm.models import split_model_name_tag
from timm_ldn.commands.benchmark import build_model as create_timm_model

HERE = Path(__file__).resolve().parent
for sub in ('fmnist', 'lra'):
    if str(HERE / sub) not in sys.path:
        sys.path.append(str(HERE / sub))  # after everything else: the tables' folders shadow nothing

__all__ = ['build_model']


def build_model(name: str, *, sequence: bool = False, registered: bool = False, img_size: Optional[int] = None,
                device: Any = 'cpu', **kwargs: Any) -> nn.Module:
    """A study row, a baseline, a sequence-benchmark row (``sequence=True``) or a registered timm model, with
    ``kwargs`` (``num_classes``, ``in_chans``, architecture overrides, layer types or their dotted paths) on top.

    ``img_size`` goes to models whose constructor takes it (a ViT's position embedding is fixed at creation).
    ``registered=True`` asks for the timm model where a study row has the same name (the block study's v1 row is
    called ``ldn_base``, as is timm's ViT-B-sized LDN): the speed benchmarks compare registered models.
    """
    if sequence:
        import models as sequence_rows  # eval/lra/models.py
        if name not in sequence_rows.ROWS:
            raise ValueError(f'unknown sequence row {name!r}; rows: {list(sequence_rows.ROWS)}.')
        with torch.device(device):
            return sequence_rows.ROWS[name](**kwargs)
    if registered:
        if not timm.is_model(split_model_name_tag(name)[0]):
            raise ValueError(f'{name!r} is not registered with timm.')
        return create_timm_model(name, img_size, kwargs, device).train()
    import study_models  # eval/fmnist/study_models.py
    if name in study_models.ROWS:
        row = study_models.ROWS[name]
        return build_model(row.model, img_size=img_size, device=device, **{**row.overrides, **kwargs})
    if name in study_models.BASELINES:
        cfg = dict(study_models.BASELINES[name])
        entry = cfg.pop('entry')
        if not isinstance(entry, str):
            with torch.device(device):
                return entry(**cfg, **kwargs)
        model = create_timm_model(entry, img_size, {**cfg, **kwargs}, device).train()
        # timm's explicit q@kᵀ/softmax/@v attention instead of the fused CPU SDPA kernel: same math, and with
        # bf16 autocast on this CPU it trains ~2x faster (measured), i.e. the stronger baseline for throughput
        for m in model.modules():
            if hasattr(m, 'fused_attn'):
                m.fused_attn = False
        return model
    if not timm.is_model(split_model_name_tag(name)[0]):
        raise ValueError(f'unknown model {name!r}: not a study row or baseline (eval/fmnist/study_models.py) and not '
                         'registered with timm; for a sequence-benchmark row pass sequence=True.')
    return create_timm_model(name, img_size, kwargs, device).train()
