"""What the diffusion does, as numbers: receptive-field growth, learned diffusion scales, A_diff rows, Grad-CAM.

The math behind ``ldn show`` (which draws these numbers). Everything here takes a model instance and works through
its stable API: ``forward_intermediates`` / ``forward_features`` / ``forward_head`` (LDN and timm ViTs alike) and,
for LDN-specific pictures, ``blocks[i].diffusion.coefficients()``, ``blocks[i].attn.qkv`` / ``.num_heads``,
``blocks[i].ls1.gamma`` and ``blocks[i].mlp.fc2``. A missing attribute raises an error naming it, never a guess.

* :func:`effective_receptive_field`: ``|∂ output token / ∂ input|`` after every block, for input pixels (maps to
  draw) and for the input tokens, i.e. the stem output ``h⁽⁰⁾`` (fractions of tokens with influence).
* :func:`diffusion_only`: a copy of an LDN with the attention and MLP branches zeroed, leaving the primary
  diffusion path alone; its token-level receptive field reaches every token exactly at the grid diameter
  (Theorem 1, :func:`timm_ldn.diffusion.grid_diameter`).
* :func:`diffusion_scales`: the effective steps ``δt·a_s`` per layer and scale, and each layer's distance to the
  explicit-Euler bound ``Σ_s |N_s|·δt·a_s < 1``.
* :func:`attention_rows`: ``w_ij / Σ_j w_ij`` of one query token per head, in ``O(N)``: the ``N×N`` matrix is
  never formed.
* :func:`grad_cam`: class evidence on the NCHW map that ``forward_features`` returns.
"""
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .diffusion import NEIGHBOURS_PER_SCALE, positive_feature_map

__all__ = [
    'create_baseline', 'ReceptiveField', 'effective_receptive_field', 'diffusion_only',
    'diffusion_offsets', 'stencil_reach', 'check_local', 'diffusion_scales', 'resolve_layer', 'resolve_query',
    'attention_feature_map', 'attention_rows', 'grad_cam',
]

OutputTokens = Union[str, Sequence[Tuple[int, int]]]


def _import_callable(spec: str) -> Callable[[], nn.Module]:
    """``FILE.py:NAME`` (the file's folder joins ``sys.path``, so its sibling imports resolve) or
    ``package.module:NAME`` -> the object ``NAME``."""
    import importlib
    import importlib.util
    import sys

    where, _, attr = spec.rpartition(':')
    try:
        if where.endswith('.py'):
            path = Path(where).resolve()
            if not path.is_file():
                raise FileNotFoundError(f'no file {where}')
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            module = importlib.import_module(path.stem)
        else:
            module = importlib.import_module(where)
        return getattr(module, attr)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        raise ValueError(
            f'Cannot import baseline {spec!r} ({e}). Give FILE.py:NAME or package.module:NAME, e.g. '
            'eval/fmnist/study_models.py:CompactConvTransformer.') from e


def create_baseline(name: str, checkpoint: Optional[Union[str, Path]] = None) -> nn.Module:
    """A baseline by timm model name, or ``FILE.py:NAME`` / ``package.module:NAME`` of a model class or factory
    (built with its defaults, e.g. the studies' ``eval/fmnist/study_models.py:vit_nano_patch4_28``), with the weights of
    ``checkpoint`` if given.

    ``checkpoint``: a bare state dict (``.pth`` / ``.safetensors``) or a timm ``train.py`` checkpoint (EMA weights
    preferred), loaded strictly. Without one the model keeps its random initialisation.
    """
    import timm
    from timm.models import load_checkpoint

    if ':' in name:  # a model class / factory outside timm's registry, e.g. the study's CCT
        model = _import_callable(name)()
    else:
        if not timm.is_model(name):
            raise ValueError(
                f'Unknown baseline {name!r}. Pass a timm model name, or a model class / factory as FILE.py:NAME / '
                'package.module:NAME (built with its default arguments), e.g. eval/fmnist/study_models.py:vit_nano_patch4_28.')
        model = timm.create_model(name, pretrained=False)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ValueError(
                f'Baseline checkpoint {checkpoint} does not exist. Pass the state dict (.pth / .safetensors) or '
                f'train.py checkpoint of {name}, or leave --baseline-checkpoint out for an untrained baseline.')
        try:
            load_checkpoint(model, str(checkpoint), use_ema=True, strict=True)
        except RuntimeError as e:  # key / shape mismatch
            raise ValueError(
                f'Baseline checkpoint {checkpoint} does not fit {name}: {str(e).splitlines()[0]} Pass a checkpoint '
                f'of this architecture.') from e
    return model.eval()


def _blocks(model: nn.Module) -> nn.Module:
    blocks = getattr(model, 'blocks', None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f'{type(model).__name__} has no `blocks`: this picture needs an LDN (ldn_* model).')
    return blocks


def _require(obj: Any, path: str, what: str) -> Any:
    """``obj.<path>`` or an error naming the attribute the picture needs."""
    for part in path.split('.'):
        if not hasattr(obj, part):
            raise AttributeError(
                f'{what} needs `{path}` on each LDN block, but {type(obj).__name__} has no `{part}`. '
                'The block layout changed: update timm_ldn/visualize.py.')
        obj = getattr(obj, part)
    return obj


def _token_map(t: torch.Tensor, grid: Tuple[int, int], channels: int, stem: nn.Module) -> torch.Tensor:
    """A stem output (or its gradient) as ``(B, C, h, w)``, whatever layout the stem emits (NCHW, NHWC, NLC)."""
    h, w = grid
    B = t.shape[0]
    layouts = {'NCHW': (B, channels, h, w), 'NHWC': (B, h, w, channels), 'NLC': (B, h * w, channels)}
    matches = [name for name, shape in layouts.items() if tuple(t.shape) == shape]
    if len(matches) > 1:  # only when C == h == w: ask the stem
        fmt = getattr(getattr(stem, 'output_fmt', None), 'value', '')
        hint = 'NLC' if getattr(stem, 'flatten', False) else str(fmt)
        matches = [hint] if hint in matches else []
    if not matches:
        raise ValueError(
            f'Cannot read a {h}x{w} grid of {channels}-channel tokens from a stem output of shape {tuple(t.shape)}.')
    if matches[0] == 'NHWC':
        return t.permute(0, 3, 1, 2)
    if matches[0] == 'NLC':
        return t.transpose(1, 2).reshape(B, channels, h, w)
    return t


def _output_tokens(spec: OutputTokens, grid: Tuple[int, int]) -> List[Tuple[int, int]]:
    h, w = grid
    if spec == 'centre':
        return [(h // 2, w // 2)]
    if spec == 'corners':
        return [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    if spec == 'all':
        return [(r, c) for r in range(h) for c in range(w)]
    if isinstance(spec, str):
        raise ValueError(f"output_tokens must be 'centre', 'corners', 'all' or a list of (row, col), got {spec!r}.")
    return [resolve_query(t, grid) for t in spec]


@dataclass
class ReceptiveField:
    """Gradient magnitudes of probed output tokens after each block, averaged over images.

    ``pixel_maps``: ``(depth, H, W)``, ``Σ_channels |∂y / ∂x|`` at the input pixels (mean over output tokens).
    ``token_maps``: ``(depth, T, h, w)``, ``Σ_channels |∂y_t / ∂h⁽⁰⁾|`` at the input tokens (stem output),
    one map per probed output token ``t``. Depth ``d`` (1-based) is the output of block ``d − 1``.
    """
    pixel_maps: torch.Tensor
    token_maps: torch.Tensor
    output_tokens: List[Tuple[int, int]]
    grid: Tuple[int, int]
    num_images: int

    def token_fraction(self, threshold: float = 0.) -> List[float]:
        """Per depth: the fraction of input tokens whose influence exceeds ``threshold × the strongest token``,
        for the probed output token that sees the fewest (``threshold=0``: any influence at all)."""
        peak = self.token_maps.flatten(2).amax(-1, keepdim=True)
        seen = self.token_maps.flatten(2) > threshold * peak
        return seen.double().mean(-1).amin(-1).tolist()

    def first_full_depth(self) -> Optional[int]:
        """First depth at which every probed output token depends on every input token (None: never)."""
        full = [d + 1 for d, f in enumerate(self.token_fraction(0.)) if f == 1.]
        return full[0] if full else None


def effective_receptive_field(
        model: nn.Module,
        images: torch.Tensor,
        output_tokens: OutputTokens = 'centre',
        batch_size: int = 8,
        progress: bool = False,
) -> ReceptiveField:
    """``|∂ output token / ∂ input|`` after every block (see :class:`ReceptiveField`), averaged over ``images``.

    Works for any model with ``forward_intermediates`` returning NCHW token maps (LDN; timm ViTs return the
    patch tokens without the class token) and a ``patch_embed`` stem. ``output_tokens``: ``'centre'``,
    ``'corners'`` (the tokens farthest from the rest for the power-of-two offsets LDN uses: they set the depth
    at which *every* output token sees every input token), ``'all'`` or a list of ``(row, col)``. Probed tokens
    run as copies of each image in one batch (``images × tokens`` forward passes).
    """
    from tqdm import tqdm

    stem = getattr(model, 'patch_embed', None)
    if stem is None:
        raise ValueError(f'{type(model).__name__} has no `patch_embed` stem: cannot measure input-token gradients.')
    model = model.eval()
    param = next(model.parameters())
    captured: List[torch.Tensor] = []
    handle = stem.register_forward_hook(lambda module, args, out: captured.append(out))
    pixel_sum = token_sum = None
    tokens: List[Tuple[int, int]] = []
    grid, channels = (0, 0), 0
    try:
        bar = tqdm(total=len(images), unit='img', desc=f'ERF {type(model).__name__}', disable=not progress)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(param.device, param.dtype)
            if not tokens:  # grid of this input size, from one cheap pass
                with torch.no_grad():
                    first = model.forward_intermediates(batch[:1], indices=1, intermediates_only=True)[-1]
                grid, channels = tuple(first.shape[-2:]), first.shape[1]
                tokens = _output_tokens(output_tokens, grid)
            n, t = batch.shape[0], len(tokens)
            x = batch.repeat_interleave(t, 0).requires_grad_(True)  # copy k of an image probes tokens[k]
            captured.clear()
            inters = model.forward_intermediates(x, indices=None, intermediates_only=True, output_fmt='NCHW')
            h0 = captured[-1]
            rows = torch.tensor([r for r, _ in tokens] * n, device=x.device)
            cols = torch.tensor([c for _, c in tokens] * n, device=x.device)
            pix, tok = [], []
            for d, y in enumerate(inters):
                # standard ERF: unit cotangent on every channel of the probed token, zero elsewhere
                picked = y[torch.arange(n * t, device=x.device), :, rows, cols].sum()
                g_x, g_h0 = torch.autograd.grad(picked, (x, h0), retain_graph=d < len(inters) - 1)
                pix.append(g_x.abs().sum(1).view(n, t, *g_x.shape[-2:]).mean(1).sum(0))
                tok.append(_token_map(g_h0, grid, channels, stem).abs().sum(1).view(n, t, *grid).sum(0))
            pix, tok = torch.stack(pix).detach(), torch.stack(tok).detach()
            pixel_sum = pix if pixel_sum is None else pixel_sum + pix
            token_sum = tok if token_sum is None else token_sum + tok
            bar.update(n)
        bar.close()
    finally:
        handle.remove()
    count = len(images)
    return ReceptiveField(
        pixel_maps=(pixel_sum / count).float().cpu(), token_maps=(token_sum / count).cpu(),
        output_tokens=tokens, grid=grid, num_images=count)


def diffusion_only(model: nn.Module) -> nn.Module:
    """A copy of an LDN whose blocks keep only the primary diffusion path (A_diff and F zeroed).

    Zeroes the attention branch's layer scale ``ls1.gamma`` (blocks without A_diff have none) and the MLP's output
    projection ``mlp.fc2`` (and a second layer scale ``ls2`` if a block has one), so both branches add exactly zero.
    Whether anything else in a block still mixes tokens is checked afterwards by :func:`check_local`; the model
    itself has no switches.
    """
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for blk in _blocks(model):
            if _has_attention(blk):
                _require(blk, 'ls1.gamma', 'diffusion_only').zero_()
            fc2 = _require(blk, 'mlp.fc2', 'diffusion_only')
            fc2.weight.zero_()
            if fc2.bias is not None:
                fc2.bias.zero_()
            ls2 = getattr(getattr(blk, 'ls2', None), 'gamma', None)
            if isinstance(ls2, torch.Tensor):
                ls2.zero_()
    return model


def diffusion_offsets(model: nn.Module) -> List[int]:
    """Grid offsets of the primary diffusion's scales (first block; every block of an LDN shares them)."""
    return [int(d) for d in _require(_blocks(model)[0], 'diffusion.offsets', 'the diffusion path')]


def stencil_reach(grid: Tuple[int, int], offsets: Sequence[int], source: Tuple[int, int], depth: int) -> torch.Tensor:
    """``(h, w)`` bool mask of tokens within ``depth`` hops of ``source`` on the multi-scale grid graph."""
    h, w = grid
    reach = torch.zeros(h, w, dtype=torch.bool)
    reach[source] = True
    for _ in range(depth):
        grown = reach.clone()
        for d in offsets:  # one hop: ±d along either axis; slices are empty when d >= the side (no edge)
            grown[d:] |= reach[:-d]
            grown[:-d] |= reach[d:]
            grown[:, d:] |= reach[:, :-d]
            grown[:, :-d] |= reach[:, d:]
        reach = grown
    return reach


def check_local(erf: ReceptiveField, offsets: Sequence[int]) -> None:
    """Raise unless every measured dependency of a diffusion-only model lies within the stencil's reach.

    After ``d`` blocks, output token ``t`` may depend only on tokens within ``d`` hops. A dependency beyond that
    means some branch still mixes tokens (e.g. one :func:`diffusion_only` did not know how to switch off, or an
    input-dependent δt pooled over the grid): then the curve would not be the diffusion path's.
    """
    for d in range(erf.token_maps.shape[0]):
        for k, token in enumerate(erf.output_tokens):
            outside = (erf.token_maps[d, k] != 0) & ~stencil_reach(erf.grid, offsets, token, d + 1)
            if outside.any():
                r, c = outside.nonzero()[0].tolist()
                raise ValueError(
                    f'Diffusion-only model is not local: after block {d} output token {token} depends on token '
                    f'({r}, {c}), more than {d + 1} stencil hops away. Some branch besides the primary diffusion '
                    'still mixes tokens; extend timm_ldn.visualize.diffusion_only to zero it.')


def _used_coefficients(model: nn.Module) -> List[torch.Tensor]:
    """``δt·a_s`` of every block as ``(S, C)``."""
    coefs = []
    for blk in _blocks(model):
        diffusion = _require(blk, 'diffusion', 'diffusion_scales')
        with torch.no_grad():
            coefs.append(_require(diffusion, 'coefficients', 'diffusion_scales')().detach().double().cpu())
    return coefs


def diffusion_scales(model: nn.Module) -> Dict[str, Any]:
    """Effective diffusion steps ``δt·a_s`` of every block, summarised over channels.

    Returns lists over blocks (outer) and scales (inner): ``mean``, ``p10``, ``p90``, ``max`` over channels;
    ``share``: each scale's fraction of the block's total step; per block ``step_sum_max`` / ``step_sum_mean``:
    ``Σ_s |N_s|·δt·a_s`` over channels (the explicit-Euler bound is ``< 1``) and ``margin = 1 − step_sum_max``.
    """
    rows: Dict[str, List] = {k: [] for k in (
        'mean', 'p10', 'p90', 'max', 'share', 'step_sum_max', 'step_sum_mean', 'margin')}
    for coef in _used_coefficients(model):  # (S, C)
        q = torch.quantile(coef, torch.tensor([.1, .9], dtype=coef.dtype), dim=1)
        step_sum = NEIGHBOURS_PER_SCALE * coef.sum(0)  # per channel: Σ_s |N_s|·δt·a_s
        rows['mean'].append(coef.mean(1).tolist())
        rows['p10'].append(q[0].tolist())
        rows['p90'].append(q[1].tolist())
        rows['max'].append(coef.amax(1).tolist())
        rows['share'].append((coef.sum(1) / coef.sum()).tolist())
        rows['step_sum_max'].append(step_sum.max().item())
        rows['step_sum_mean'].append(step_sum.mean().item())
        rows['margin'].append(1. - step_sum.max().item())
    return dict(offsets=diffusion_offsets(model), neighbours_per_scale=NEIGHBOURS_PER_SCALE, **rows)


def resolve_layer(model: nn.Module, layer: int) -> int:
    """``layer`` as a block index (negative counts from the end), or a ValueError naming the valid range."""
    depth = len(_blocks(model))
    if not -depth <= layer < depth:
        raise ValueError(
            f'Layer {layer} does not exist: the model has {depth} blocks. '
            f'Pass a layer between 0 and {depth - 1} (or -1 for the last).')
    return layer % depth


def resolve_query(query: Union[int, Tuple[int, int], Sequence[int]], grid: Tuple[int, int]) -> Tuple[int, int]:
    """A query token as ``(row, col)`` from ``(row, col)`` or a flat index, or a ValueError naming the grid."""
    h, w = grid
    if isinstance(query, int):
        if not 0 <= query < h * w:
            raise ValueError(
                f'Token index {query} is outside the {h}x{w} token grid ({h * w} tokens). '
                f'Pass an index between 0 and {h * w - 1}, or row,col with 0 <= row < {h} and 0 <= col < {w}.')
        return divmod(query, w)
    r, c = (int(v) for v in query)
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(
            f'Token ({r}, {c}) is outside the {h}x{w} token grid. Pass row,col with 0 <= row < {h} and '
            f'0 <= col < {w}.')
    return r, c


def _has_attention(blk: nn.Module) -> bool:
    """False for blocks built without A_diff (an attention layer without parameters, e.g. the study's ablation)."""
    attn = getattr(blk, 'attn', None)
    return attn is not None and any(True for _ in attn.parameters())


def attention_feature_map(attn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """φ of a linear-kernel attention module: its own ``feature_map`` method if it has one, else ``elu + 1``."""
    phi = getattr(attn, 'feature_map', None)
    return phi if callable(phi) else positive_feature_map


def attention_rows(
        model: nn.Module,
        images: torch.Tensor,
        layer: int,
        query: Union[int, Tuple[int, int]],
) -> torch.Tensor:
    """Normalised A_diff weights ``w_ij / Σ_j w_ij`` of query token ``i`` in block ``layer``, ``(B, heads, h, w)``.

    The block's attention input is captured with a hook and ``q_i``, ``K`` recomputed from ``attn.qkv``:
    ``w_ij = φ(q_i)·φ(k_j)``, one row, ``O(N·d)`` per head. As a guard against a changed kernel the row is checked against the layer's own output: ``Σ_j ŵ_ij
    v_j − v_i`` must equal what the block's ``attn`` computed for token ``i`` before its output projection.
    """
    layer = resolve_layer(model, layer)
    if not _has_attention(model.blocks[layer]):
        raise ValueError(f'Block {layer} has no A_diff (built without attention): pick another --layer.')
    attn = _require(model.blocks[layer], 'attn', 'attention_rows')
    qkv_proj = _require(attn, 'qkv', 'attention_rows')
    num_heads = _require(attn, 'num_heads', 'attention_rows')
    proj = _require(attn, 'proj', 'attention_rows')
    captured: Dict[str, torch.Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, args: captured.__setitem__('u', args[0])),
        proj.register_forward_pre_hook(lambda m, args: captured.__setitem__('a', args[0])),
    ]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            out = model.eval().forward_intermediates(
                images.to(param.device, param.dtype), indices=[layer], stop_early=True, intermediates_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    if 'u' not in captured or 'a' not in captured:  # a fused block that bypasses the modules' forward
        raise RuntimeError(
            f'Block {layer} did not run attn and attn.proj as modules, so their inputs could not be captured. '
            'Update timm_ldn.visualize.attention_rows to the block\'s new attention path.')
    grid = tuple(out[-1].shape[-2:])
    r, c = resolve_query(query, grid)
    i = r * grid[1] + c
    with torch.no_grad():
        u = captured['u']
        u = u.reshape(u.shape[0], -1, u.shape[-1])  # a channels-last map or a sequence: (B, N, C)
        B, N, C = u.shape
        d = C // num_heads
        qkv = qkv_proj(u)
        q = qkv[:, i, :C].reshape(B, num_heads, 1, d)
        k = qkv[:, :, C:2 * C].reshape(B, N, num_heads, d).transpose(1, 2)  # (B, heads, N, d)
        v = qkv[:, :, 2 * C:].reshape(B, N, num_heads, d).transpose(1, 2)
        phi = attention_feature_map(attn)
        w = (phi(k) * phi(q)).sum(-1)  # (B, heads, N): one row of W
        w = w / w.sum(-1, keepdim=True)
        recomputed = (w.unsqueeze(-1) * v).sum(-2) - v[:, :, i]  # (B, heads, d)
        actual = captured['a'][:, i].reshape(B, num_heads, d)
        err = (recomputed - actual).abs().max().item()
        scale = actual.abs().max().item() + 1e-6
        if err > 1e-3 * scale + 1e-5:
            raise RuntimeError(
                f'The recomputed A_diff row of block {layer} differs from the block\'s own output by {err:.3g} '
                f'(scale {scale:.3g}): the attention kernel changed (φ or normalisation). Update '
                'timm_ldn.visualize.attention_rows to match it.')
    return w.reshape(B, num_heads, *grid).float().cpu()


def grad_cam(
        model: nn.Module,
        images: torch.Tensor,
        target: Optional[Union[int, Sequence[int]]] = None,
) -> Dict[str, torch.Tensor]:
    """Grad-CAM on the NCHW map of ``forward_features``: ``relu(Σ_c mean_hw(∂score/∂F_c) · F_c)``.

    ``target``: class per image (default: the predicted one). Returns ``cam`` ``(B, h, w)`` scaled to ``[0, 1]``
    per image, ``target`` ``(B,)`` and ``prob`` (softmax probability of the target).
    """
    param = next(model.parameters())
    x = images.to(param.device, param.dtype)
    model = model.eval()
    feats = model.forward_features(x)
    if feats.dim() != 4:
        raise ValueError(
            f'Grad-CAM needs a spatial feature map: forward_features of {type(model).__name__} returned shape '
            f'{tuple(feats.shape)}, not (B, C, h, w).')
    logits = model.forward_head(feats)
    probs = logits.softmax(-1)
    if target is None:
        cls = logits.argmax(-1)
    else:
        cls = torch.as_tensor(target, device=x.device).expand(x.shape[0])
    score = logits.gather(1, cls[:, None]).sum()
    (grads,) = torch.autograd.grad(score, feats)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * feats).sum(1)).detach()
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return dict(cam=cam.float().cpu(), target=cls.cpu(), prob=probs.gather(1, cls[:, None])[:, 0].detach().cpu())
