"""``ldn show [PICTURE...] --model NAME[.TAG] --images PATH...``: what the diffusion does, as PNGs plus JSON numbers.

Pictures (default: all), each ``<out>/<picture>.png`` with the numbers behind it in ``<out>/<picture>.json``:

* ``erf``: effective receptive field of the centre token after every block, for the model, its diffusion path
  alone (A_diff and F zeroed) and optionally a baseline (``--baseline``); fraction of input tokens with influence
  against depth, with the depth where the diffusion path reaches every token marked against the grid diameter.
* ``diffusion``: learned effective steps ``δt·a_s`` per layer and scale, and each layer's stability margin.
* ``attention``: normalised A_diff weights of one query token, per head of one layer, over the image.
* ``gradcam``: Grad-CAM class evidence for the predicted class on ``forward_features``' map.

The math lives in :mod:`timm_ldn.visualize`; this module loads models and images and draws.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['add_arguments', 'run', 'PICTURES', 'load_images', 'plot_erf', 'plot_diffusion', 'plot_attention',
           'plot_gradcam']

PICTURES = ('erf', 'diffusion', 'attention', 'gradcam')
GRADCAM_MAX_IMAGES = 10  # one picture stays readable
ERF_LOG_FLOOR = 1e-4  # ERF maps are drawn on a log scale from this fraction of their peak


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pictures', nargs='*', metavar='PICTURE',
                        help=f'any of {", ".join(PICTURES)} (default: all)')
    parser.add_argument('--model', '-m', required=True, metavar='NAME[.TAG]',
                        help='LDN to show, e.g. ldn_nano_patch4_28.fmnist_v2 (published weights) or ldn_small '
                             '--random-init')
    parser.add_argument('--checkpoint', metavar='FILE', help='load these weights instead of the published ones')
    parser.add_argument('--random-init', action='store_true', help='randomly initialised model (no weights needed)')
    parser.add_argument('--images', nargs='+', required=True, metavar='IMAGE_OR_DIR',
                        help='images and/or folders of images (the ERF is averaged over them)')
    parser.add_argument('--num-images', type=int, default=64, help='use at most this many images (default 64)')
    parser.add_argument('--img-size', type=int, help='input size (default: the model\'s pretrained cfg)')
    parser.add_argument('--baseline', metavar='NAME',
                        help='baseline for the ERF curve: a timm model, or a model class / factory as FILE.py:NAME / '
                             'package.module:NAME (e.g. eval/fmnist/study_models.py:vit_nano_patch4_28)')
    parser.add_argument('--baseline-checkpoint', metavar='FILE',
                        help='trained baseline weights (state dict or train.py checkpoint); without it the baseline '
                             'is random init and labelled "untrained"')
    parser.add_argument('--layer', type=int, default=-1, help='block of the attention picture (default -1: last)')
    parser.add_argument('--query', default='centre', metavar='ROW,COL',
                        help='query token of the attention picture: row,col or a flat index (default: centre)')
    parser.add_argument('--attention-images', type=int, default=3, help='images in the attention picture')
    parser.add_argument('--threshold', type=float, default=0.01,
                        help='a token has non-negligible influence above this fraction of the strongest (default 0.01)')
    parser.add_argument('--all-tokens', action='store_true',
                        help='diffusion-path curve over every output token instead of the four corners (slower)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--out', default='ldn_show', metavar='DIR', help='output folder (default ./ldn_show)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar (also off when not a terminal)')


def _load_model(args: argparse.Namespace) -> Tuple[nn.Module, str]:
    import timm
    from timm_ldn.commands.predict import load_model

    if args.random_init:
        return timm.create_model(args.model, pretrained=False).eval(), 'random init'
    model, source = load_model(args.model, args.checkpoint)
    return model, f'trained, weights from {source}'


def load_images(
        inputs: Sequence[str],
        model: nn.Module,
        img_size: Optional[int] = None,
        limit: Optional[int] = None,
) -> Tuple[torch.Tensor, List[Path], Dict[str, Any]]:
    """Images as the model's eval transform makes them, ``(B, C, H, W)``; their paths; the data config.

    A missing path or an unreadable image raises a ValueError naming it.
    """
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from timm_ldn.commands.predict import collect_images

    files, missing = collect_images(inputs)
    if missing:
        raise ValueError(f'Image path {missing[0][0]} does not exist. Pass image files or folders of images.')
    if not files:
        raise ValueError(f'No image files in {" ".join(inputs)}. Pass image files (png, jpg, …) or folders of them.')
    files = files[:limit] if limit else files
    data_cfg = resolve_data_config({}, model=model)
    if img_size:
        data_cfg['input_size'] = (data_cfg['input_size'][0], img_size, img_size)
    transform = create_transform(**data_cfg)
    mode = 'L' if data_cfg['input_size'][0] == 1 else 'RGB'
    batch = []
    for path in files:
        try:
            with Image.open(path) as img:
                batch.append(transform(img.convert(mode)))
        except Exception as e:  # PIL raises many types for broken / non-image files
            raise ValueError(
                f'Cannot read image {path} ({type(e).__name__}: {e}). Pass image files PIL can open, or remove it '
                'from --images.') from e
    return torch.stack(batch), files, data_cfg


def _display(images: torch.Tensor, data_cfg: Dict[str, Any]) -> torch.Tensor:
    """Normalised model inputs back to ``[0, 1]`` pixels, ``(B, H, W, C)``."""
    mean = torch.tensor(data_cfg['mean']).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg['std']).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def _show_image(ax, pixels: torch.Tensor) -> None:
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0].numpy(), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
    else:
        ax.imshow(pixels.numpy(), interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError(
            'ldn show draws its pictures with matplotlib, which is not installed: pip install matplotlib') from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _rounded(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _write_json(path: Path, payload: Dict[str, Any]) -> None:
    path.write_text(json.dumps(_rounded(payload), indent=1) + '\n')


def plot_erf(maps: List[Tuple[str, Any]], curves: List[Dict[str, Any]], path: Path, threshold: float) -> None:
    """Log-scale ERF maps per depth (``maps``: one row per (label, ReceptiveField)) and token fractions against
    depth (``curves``: dicts of ``label``, ``fraction``, optional ``style`` and ``diameter`` to mark)."""
    from matplotlib.colors import LogNorm
    plt = _plt()
    depth = max(erf.pixel_maps.shape[0] for _, erf in maps)
    cols = list(range(depth)) if depth <= 8 else list(range(1, depth, 2))  # depths drawn (0-based)
    fig = plt.figure(figsize=(1.3 * len(cols) + 4.6, 1.35 * len(maps) + 0.6), dpi=80)
    grid = fig.add_gridspec(len(maps), len(cols) + 1, width_ratios=[1] * len(cols) + [3.4], wspace=0.08)
    for i, (short, erf) in enumerate(maps):
        for j, d in enumerate(cols):
            ax = fig.add_subplot(grid[i, j])
            if d < erf.pixel_maps.shape[0]:
                m = erf.pixel_maps[d] / erf.pixel_maps[d].max().clamp_min(1e-30)
                ax.imshow(m.clamp_min(ERF_LOG_FLOOR).numpy(), norm=LogNorm(ERF_LOG_FLOOR, 1.), cmap='magma',
                          interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f'depth {d + 1}', fontsize=8)
            if j == 0:
                ax.set_ylabel(short, fontsize=7)
    ax = fig.add_subplot(grid[:, -1])
    for curve in curves:
        fraction = [100 * f for f in curve['fraction']]
        ax.plot(range(1, len(fraction) + 1), fraction, curve.get('style', '-o'), ms=3, label=curve['label'],
                color=curve.get('color'))
        if curve.get('diameter'):
            dia = curve['diameter']
            ax.plot([dia], [fraction[dia - 1]] if dia <= len(fraction) else [100.], '*', ms=13, color='crimson',
                    zorder=5, label=f'grid diameter {dia} (Theorem 1)')
    ax.set_xlabel('depth (blocks)')
    ax.set_ylabel('% of input tokens with influence')
    ax.set_ylim(-3, 103)
    ax.yaxis.set_label_position('right')
    ax.yaxis.tick_right()
    ax.grid(alpha=.3)
    ax.legend(fontsize=6.5, loc='lower right')
    fig.suptitle('Effective receptive field of the centre token '
                 f'(|∂y/∂x|, log colour, ≥{ERF_LOG_FLOOR:g} of peak); '
                 f'curves: influence > {threshold:g}× strongest token unless marked', fontsize=8)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)


def plot_diffusion(stats: Dict[str, Any], path: Path, title: str) -> None:
    """Heat map of mean ``δt·a_s`` (layers × scales, channel p10–p90 in the cells) and per-layer step sums."""
    plt = _plt()
    mean = torch.tensor(stats['mean'])
    layers, scales = mean.shape
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(3.2 + 1.1 * scales, 0.45 * layers + 1.6), dpi=90,
                                 gridspec_kw=dict(width_ratios=[scales, 2.4], wspace=.45))
    im = ax.imshow(mean.numpy(), cmap='viridis', aspect='auto')
    for i in range(layers):
        for s in range(scales):
            text = f'{stats["mean"][i][s]:.3f}\n[{stats["p10"][i][s]:.3f}, {stats["p90"][i][s]:.3f}]'
            ax.text(s, i, text, ha='center', va='center', fontsize=6.5,
                    color='white' if mean[i, s] < mean.max() * .6 else 'black')
    ax.set_xticks(range(scales), [f'offset {d}' for d in stats['offsets']], fontsize=7)
    ax.set_yticks(range(layers), [f'block {i}' for i in range(layers)], fontsize=7)
    ax.set_title('δt·a_s: channel mean [p10, p90]', fontsize=8)
    fig.colorbar(im, ax=ax, fraction=.05, pad=.03)
    y = range(layers)
    bx.barh(y, stats['step_sum_max'], color='tab:orange', label='max over channels')
    bx.barh(y, stats['step_sum_mean'], color='tab:blue', height=.5, label='channel mean')
    bx.axvline(1., color='crimson', ls='--', label='stability bound')
    for i, margin in enumerate(stats['margin']):
        bx.text(stats['step_sum_max'][i] + .02, i, f'margin {margin:.2f}', va='center', fontsize=6)
    bx.set_yticks(list(y), [])
    bx.invert_yaxis()
    bx.set_xlim(0, 1.3)
    bx.set_xlabel(f'Σ_s {stats["neighbours_per_scale"]}·δt·a_s', fontsize=7)
    bx.legend(fontsize=6, loc='upper right')
    bx.set_title('distance to the bound', fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)


def _overlay(ax, pixels: torch.Tensor, heat: torch.Tensor, cmap: str = 'inferno', vmax: Optional[float] = None):
    _show_image(ax, pixels)
    H, W = pixels.shape[:2]
    return ax.imshow(heat.numpy(), cmap=cmap, alpha=.6, extent=(-.5, W - .5, H - .5, -.5), interpolation='nearest',
                     vmin=0, vmax=vmax)


def plot_attention(
        pixels: torch.Tensor, weights: torch.Tensor, query: Tuple[int, int], layer: int, path: Path, title: str,
) -> None:
    """Per image (rows) and head (columns): the query's normalised A_diff weights over the image."""
    from matplotlib.patches import Rectangle
    plt = _plt()
    B, heads, h, w = weights.shape
    H, W = pixels.shape[1:3]
    ph, pw = H / h, W / w
    fig, axes = plt.subplots(B, heads + 1, figsize=(1.9 * (heads + 1), 1.9 * B + .5), dpi=90, squeeze=False)
    for b in range(B):
        _show_image(axes[b, 0], pixels[b])
        for a in range(heads):
            ax = axes[b, a + 1]
            im = _overlay(ax, pixels[b], weights[b, a])
            ax.add_patch(Rectangle((query[1] * pw - .5, query[0] * ph - .5), pw, ph, fill=False, ec='cyan', lw=1.5))
            ax.set_title(f'head {a}: max {weights[b, a].max():.3f}', fontsize=7)
            fig.colorbar(im, ax=ax, fraction=.046)
    axes[0, 0].set_title('input', fontsize=7)
    fig.suptitle(f'{title}\nA_diff weights w_ij/Σ_j w_ij of query token {query} (cyan), block {layer} '
                 f'(uniform = {1 / (h * w):.3f})', fontsize=8)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)


def plot_gradcam(pixels: torch.Tensor, cam: torch.Tensor, captions: List[str], path: Path, title: str) -> None:
    plt = _plt()
    n = pixels.shape[0]
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows + .4), dpi=90, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < n:
            _overlay(ax, pixels[k], cam[k], cmap='jet', vmax=1.)
            ax.set_title(captions[k], fontsize=6.5)
        else:
            ax.axis('off')
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)


def _parse_query(text: str, grid: Tuple[int, int]):
    if text == 'centre':
        return grid[0] // 2, grid[1] // 2
    parts = text.split(',')
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f'--query {text!r} is not row,col or a flat token index (e.g. --query 3,3 or --query 24).')
    if len(values) == 1:
        return values[0]
    if len(values) != 2:
        raise ValueError(f'--query {text!r}: give row,col (two numbers) or one flat token index.')
    return tuple(values)


def _show_erf(args, model, label, images, progress) -> Dict[str, Any]:
    """ERF of the model, its diffusion path alone and the baseline: draws erf.png, returns the numbers."""
    from timm_ldn.diffusion import grid_diameter
    from timm_ldn.visualize import (
        check_local, create_baseline, diffusion_offsets, diffusion_only, effective_receptive_field)

    kw = dict(batch_size=args.batch_size, progress=progress)
    maps, curves = [], []

    def add(short: str, curve_label: str, erf) -> None:
        maps.append((short, erf))
        curves.append(dict(label=curve_label, fraction=erf.token_fraction(args.threshold),
                           fraction_any_influence=erf.token_fraction(0.)))

    erf = effective_receptive_field(model, images, 'centre', **kw)
    add(f'{args.model}\n({label})', f'{args.model} ({label})', erf)
    if args.baseline:
        base = create_baseline(args.baseline, args.baseline_checkpoint)
        state = 'trained' if args.baseline_checkpoint else 'untrained'
        add(f'{args.baseline}\n({state})', f'{args.baseline} ({state})',
            effective_receptive_field(base, images, 'centre', **kw))
    # the diffusion path alone, in float64 so a tiny but non-zero dependency is never rounded to zero
    diff = diffusion_only(model).double()
    offsets = diffusion_offsets(model)
    erf_centre = effective_receptive_field(diff, images.double(), 'centre', **kw)
    erf_every = effective_receptive_field(diff, images.double(), 'all' if args.all_tokens else 'corners', **kw)
    diameter = grid_diameter(*erf_every.grid, offsets)
    probe = 'every output token' if args.all_tokens else 'corner tokens (the last to see everything)'
    try:
        for e in (erf_centre, erf_every):
            check_local(e, offsets)
        path_numbers = dict(
            probe=probe, first_full_depth=erf_every.first_full_depth(), grid_diameter=diameter,
            centre_token_first_full_depth=erf_centre.first_full_depth())
    except ValueError as e:  # e.g. a time step pooled over the grid: the path is not the stencil's alone
        print(f'ldn show: diffusion-path curve left out: {e}', file=sys.stderr)
        path_numbers = dict(left_out=str(e), grid_diameter=diameter)
    else:
        maps.append(('diffusion\npath only', erf_centre))
        curves.append(dict(label='diffusion path only, centre token, any influence',
                           fraction=erf_centre.token_fraction(0.), style=':s', color='tab:green'))
        curves.append(dict(label=f'diffusion path only, {probe.split(" (")[0]}, any influence',
                           fraction=erf_every.token_fraction(0.), style='--^', color='tab:red', diameter=diameter))
    plot_erf(maps, curves, Path(args.out) / 'erf.png', args.threshold)
    return dict(
        grid=list(erf.grid), offsets=offsets, threshold=args.threshold, num_images=erf.num_images,
        depths=list(range(1, len(erf.token_fraction()) + 1)),
        curves=[{k: v for k, v in c.items() if k not in ('style', 'color')} for c in curves],
        diffusion_path=path_numbers,
    )


def run(args: argparse.Namespace) -> int:
    import timm_ldn  # noqa: F401  registers ldn_* with timm
    from timm_ldn.hub import WeightsError
    from timm_ldn import visualize as V

    pictures = args.pictures or list(PICTURES)
    unknown = [p for p in pictures if p not in PICTURES]
    if unknown:
        print(f'ldn show: error: unknown picture {unknown[0]!r}; choose from {", ".join(PICTURES)}.', file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        model, label = _load_model(args)
    except (WeightsError, RuntimeError, FileNotFoundError) as e:
        print(f'ldn show: error: cannot load {args.model}: {e} (use --random-init for a randomly initialised '
              'model)', file=sys.stderr)
        return 2
    out = Path(args.out)
    title = f'{args.model} ({label.split(",")[0]})'
    try:
        V.resolve_layer(model, args.layer)  # fail on a bad argument before any long computation
        images, files, data_cfg = load_images(args.images, model, args.img_size, args.num_images)
        pixels = _display(images, data_cfg)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(model=args.model, weights=label, images=[str(f) for f in files],
                    input_size=list(data_cfg['input_size']))
        if 'attention' in pictures:  # cheap, and validates --query before the slow pictures run
            n = max(1, min(args.attention_images, len(images)))
            with torch.no_grad():
                grid = tuple(model.forward_features(images[:1]).shape[-2:])
            query = V.resolve_query(_parse_query(args.query, grid), grid)
            layer = V.resolve_layer(model, args.layer)
            weights = V.attention_rows(model, images[:n], layer, query)
            plot_attention(pixels[:n], weights, query, layer, out / 'attention.png', title)
            _write_json(out / 'attention.json', dict(
                meta, layer=layer, query=list(query), grid=list(grid), images=[str(f) for f in files[:n]],
                weights=weights.tolist()))
        if 'diffusion' in pictures:
            stats = V.diffusion_scales(model)
            plot_diffusion(stats, out / 'diffusion.png', f'{title}: learned diffusion per layer')
            _write_json(out / 'diffusion.json', dict(meta, **stats))
        if 'gradcam' in pictures:
            names = model.pretrained_cfg.get('label_names')
            n = min(len(images), GRADCAM_MAX_IMAGES)
            res = V.grad_cam(model, images[:n])
            captions = [f'{files[k].stem[:18]}\n→ {names[c] if names else c} ({100 * p:.0f}%)'
                        for k, (c, p) in enumerate(zip(res['target'].tolist(), res['prob'].tolist()))]
            plot_gradcam(pixels[:n], res['cam'], captions, out / 'gradcam.png',
                         f'{title}: Grad-CAM of the predicted class')
            _write_json(out / 'gradcam.json', dict(
                meta, images=[str(f) for f in files[:n]], target=res['target'].tolist(), prob=res['prob'].tolist(),
                cam=res['cam'].tolist()))
        if 'erf' in pictures:
            _write_json(out / 'erf.json', dict(meta, **_show_erf(args, model, label.split(',')[0], images, progress)))
    except (ValueError, AttributeError) as e:
        print(f'ldn show: error: {e}', file=sys.stderr)
        return 2
    print(f'# wrote {", ".join(p + ".png" for p in pictures)} (+ .json) to {out}', file=sys.stderr)
    return 0
