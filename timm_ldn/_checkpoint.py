"""Checkpoint compatibility of LDN models: unwrapping, parameter-layout versions, one clear error per mismatch.

``checkpoint_filter_fn`` (timm's ``pretrained_filter_fn``) turns any LDN checkpoint into a state dict of the current
layout; strictness stays the caller's (``pretrained_strict``, ``load_state_dict(strict=...)``). The load pre-hook
``architecture_pre_hook`` runs before any tensor is copied and, when the checkpoint cannot fit (a shape would
mismatch, or not one trunk tensor would be copied), raises one short message naming the mismatch, "not an LDN
checkpoint (it has conv1.weight, ...)" or "embed_dim 384 in the checkpoint vs 192 in the model (ldn_small vs
ldn_tiny)", instead of torch's list of hundreds of keys. It subclasses ``RuntimeError``, which callers of
``load_state_dict`` (timm's ``load_checkpoint`` / ``resume_checkpoint``) already expect. Nothing here imports the
model: ``ldn.py`` imports this module, never the reverse.
"""
import re
from typing import Any, Dict, List, Mapping, Optional

import torch

# Version of the parameter layout (state-dict names, shapes and parameterisation), recorded by `ldn export` in the
# manifest and config.json. v1: F = MLP ratio 4 (timm-ldn < 0.2, retired). v2: F = MLP ratio 3.875 with a 3×3
# depthwise conv on the hidden layer (mlp.dwconv.*). Bump it with a converter here when the layout changes.
LDN_LAYOUT_VERSION = 2
LAYOUT_VERSION_KEY = 'ldn_layout_version'

_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.')
# names the registered variants go by, for the message only
_KNOWN = {(192, 12): 'ldn_tiny', (384, 12): 'ldn_small', (768, 12): 'ldn_base'}


class CheckpointArchitectureError(RuntimeError):
    """The checkpoint was saved from a different architecture (or a different LDN size) than the model."""


def _describe(tensors: Mapping[str, Any]) -> Dict[str, Any]:
    """Architecture hyper-parameters readable from LDN parameter names and shapes (unknown ones left out)."""
    out: Dict[str, Any] = {}
    w = tensors.get('patch_embed.proj.weight')
    if w is not None and getattr(w, 'dim', lambda: 0)() == 4:
        out['embed_dim'] = int(w.shape[0])
        out['in_chans'] = int(w.shape[1])
        out['patch_size'] = tuple(int(s) for s in w.shape[2:])
    depth = [int(m.group(1)) + 1 for m in map(_BLOCK_RE.match, tensors) if m]
    if depth:
        out['depth'] = max(depth)
    fc = tensors.get('head.fc.weight')
    if fc is not None and getattr(fc, 'dim', lambda: 0)() == 2:
        out['num_classes'] = int(fc.shape[0])
    a = tensors.get('blocks.0.diffusion.a_raw')
    if a is not None and getattr(a, 'dim', lambda: 0)() == 2:
        out['diffusion_scales'] = int(a.shape[0])
    return out


def _name(desc: Dict[str, Any]) -> Optional[str]:
    return _KNOWN.get((desc.get('embed_dim'), desc.get('depth')))


def architecture_pre_hook(
        module: torch.nn.Module,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
) -> None:
    """``load_state_dict`` pre-hook for ``LinearDiffusionNet``; raises before torch's long generic error."""
    ckpt = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not ckpt:
        return
    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    cls = type(module).__name__

    # head.* names are shared with e.g. ConvNeXt / ViT checkpoints, so they do not make a checkpoint LDN-like
    ldn_like = [k for k in ckpt
                if (k in own and not k.startswith('head.')) or k.startswith('patch_embed.') or '.diffusion.' in k]
    if not ldn_like:
        # would copy no tensor at all; raised even for strict=False (torch hands hooks strict=True regardless)
        foreign = ', '.join(list(ckpt)[:4])
        raise CheckpointArchitectureError(
            f'Not an LDN checkpoint: none of its {len(ckpt)} tensors belong to {cls} (it has e.g. {foreign}; '
            f'an LDN checkpoint has patch_embed.proj.weight, blocks.<i>.diffusion.a_raw, ...). It was saved '
            f'from another architecture: create that model instead, or pass the right LDN checkpoint.')

    # F with / without depthwise conv (layout v2 / v1): one message with the fix, not a list of shapes
    ckpt_dwconv = any('.mlp.dwconv.' in k for k in ckpt)
    if any(k.endswith('.mlp.fc1.weight') for k in ckpt) and ckpt_dwconv != any('.mlp.dwconv.' in k for k in own):
        raise CheckpointArchitectureError(
            f'LDN checkpoint does not fit this {cls}: ' + layout_mismatch_message(ckpt_dwconv))

    have, want = _describe(ckpt), _describe(own)
    # only fields that change tensor shapes: torch fails on those even with strict=False, so naming them never
    # rejects a load torch would accept. Depth is left to torch (missing/unexpected blocks.<i>.* keys): torch
    # passes strict=True to every hook, so a legit strict=False load into a pruned model is indistinguishable.
    fields = ['embed_dim', 'patch_size', 'in_chans', 'diffusion_scales', 'num_classes']
    diffs = [f'{f} {have[f]} in the checkpoint vs {want[f]} in the model'
             for f in fields if f in have and f in want and have[f] != want[f]]
    if diffs:
        names = ''
        if _name(have) or _name(want):
            names = f' (checkpoint looks like {_name(have) or "a custom LDN"}, model is {_name(want) or "a custom LDN"})'
        raise CheckpointArchitectureError(
            f'LDN checkpoint does not fit this {cls}: ' + '; '.join(diffs) + names
            + '. Create the model with the matching variant / arguments.')


def layout_mismatch_message(checkpoint_has_dwconv: bool) -> str:
    """What to do when a checkpoint's local update F (with / without depthwise conv) differs from the model's."""
    if checkpoint_has_dwconv:
        return ('the checkpoint has a 3x3 depthwise conv in F (mlp.dwconv.*, parameter layout v2, the default) but '
                'the model was created without it: drop mlp_layer / mlp_ratio from the create_model arguments.')
    return ('the checkpoint has F without depthwise conv (parameter layout v1 of timm-ldn < 0.2, or a model built '
            'with a plain MLP) and the model has the default F. Create the model with a plain MLP to load it: '
            'timm.create_model(<arch>, mlp_layer=timm.layers.Mlp, mlp_ratio=4.0, ...).')


def unwrap_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The model weights inside a train.py checkpoint (EMA preferred), without DDP / torch.compile prefixes."""
    state = checkpoint
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    out = {}
    for k, v in state.items():
        while k.startswith(('module.', '_orig_mod.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: torch.nn.Module) -> Dict[str, Any]:
    """Any LDN checkpoint as a state dict of the current parameter layout for ``model``.

    Accepts a bare state dict (safetensors / ``torch.save(model.state_dict())``) or a checkpoint as timm's train.py
    writes it (``checkpoint-*.pth.tar``, ``model_best.pth.tar``: ``state_dict_ema`` preferred over ``state_dict``,
    also ``model`` / ``model_ema``), strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes and reads
    the layout version. Missing or extra keys are left to ``load_state_dict``'s ``strict`` (timm's
    ``pretrained_strict``), so partial loads work as in timm; tensors that cannot fit raise in the pre-hook.
    """
    checkpoint = state_dict
    state_dict = unwrap_checkpoint(checkpoint)
    version = state_dict.pop(LAYOUT_VERSION_KEY, checkpoint.get(LAYOUT_VERSION_KEY, None))
    if version is not None:
        version = int(version.item() if isinstance(version, torch.Tensor) else version)
        if version > LDN_LAYOUT_VERSION:
            raise CheckpointArchitectureError(
                f'Checkpoint has LDN parameter layout v{version}, this timm-ldn reads up to v{LDN_LAYOUT_VERSION}. '
                'Upgrade timm-ldn.')
    return state_dict
