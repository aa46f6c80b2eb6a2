"""A clear error when a checkpoint of another architecture is loaded into an LDN model.

torch's own ``load_state_dict`` error for a ResNet checkpoint (or an ldn_small one loaded into ldn_tiny) lists every
one of hundreds of keys or shapes. This pre-hook runs before any tensor is copied and, when the checkpoint cannot
fit (a shape would mismatch, or not one trunk tensor would be copied), raises one short message naming the mismatch: "not an LDN checkpoint (it has conv1.weight, ...)", or
"embed_dim 384 in the checkpoint vs 192 in the model (ldn_small vs ldn_tiny)". It subclasses ``RuntimeError``,
which is what callers of ``load_state_dict`` (timm's ``load_checkpoint`` / ``resume_checkpoint``) already expect.
"""
import re
from typing import Any, Dict, List, Mapping, Optional

import torch

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

    # layout v1 (F without depthwise conv, MLP ratio 4) vs v2: one message with the fix, not a list of shapes
    ckpt_dwconv = any('.mlp.dwconv.' in k for k in ckpt)
    if any(k.endswith('.mlp.fc1.weight') for k in ckpt) and ckpt_dwconv != any('.mlp.dwconv.' in k for k in own):
        from .ldn import layout_mismatch_message
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
