"""``ldn info NAME``: parameters, GMACs, pretrained cfg and the published weights of an LDN model."""
import argparse
import json
from typing import Any, Dict, Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ['add_arguments', 'run', 'model_stats']


def model_stats(model: nn.Module, input_size: Sequence[int]) -> Tuple[int, float]:
    """(parameter count, GMACs for one image of ``input_size``), by the project's shared counter
    (``timm_ldn.profiling``: FlopCounterMode, MACs = FLOPs / 2, attention made visible to the counter)."""
    from timm_ldn.profiling import count_cost, count_params
    return count_params(model), count_cost(model, input_size)['gmacs']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', metavar='NAME[.TAG]', help='model name, e.g. ldn_tiny or ldn_tiny.<tag>')
    parser.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'),
                        help='input size for the GMACs count (default: the pretrained cfg\'s input_size)')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of text')


def _weights_info(name: str) -> Dict[str, Any]:
    """Where the weights of ``name`` live: Hub repo + manifest record + shipped local copy (if any)."""
    from timm_ldn.hub import ChecksumError, load_manifest, local_weight_file, manifest_path
    manifest = load_manifest()
    entry = manifest.get('weights', {}).get(name)
    if entry is None:
        return {}
    info = {k: entry.get(k) for k in ('hf_hub_id', 'filename', 'sha256', 'size', 'eval', 'provenance', 'reproduce')}
    info['manifest'] = str(manifest_path())
    try:
        local = local_weight_file(name, manifest)
        info['local_file'] = str(local) if local else None
    except ChecksumError as e:
        info['local_file'] = f'INVALID: {e}'
    return info


def run(args: argparse.Namespace) -> int:
    import timm
    import timm_ldn  # noqa: F401  registers ldn_* with timm
    from timm.models import get_pretrained_cfg, split_model_name_tag
    from timm_ldn.hub import tags_with_weights

    arch, tag = split_model_name_tag(args.model)
    if not timm.is_model(arch):
        print(f'Unknown model {arch!r}. LDN models: {", ".join(timm.list_models("ldn_*"))}')
        return 2
    try:
        cfg = get_pretrained_cfg(args.model)
    except RuntimeError as e:
        print(f'{e} Tags with weights: {", ".join(tags_with_weights(arch + ".*")) or "none"}.')
        return 2
    cfg = cfg.to_dict() if cfg is not None else {}
    input_size = tuple(args.input_size or cfg.get('input_size') or (3, 224, 224))
    model = timm.create_model(args.model, pretrained=False)
    params, gmacs = model_stats(model, input_size)
    published = {t: _weights_info(t) for t in tags_with_weights(arch + '.*')}
    report = dict(
        model=args.model,
        architecture=arch,
        params=params,
        gmacs=round(gmacs, 4),
        gmacs_input_size=list(input_size),
        pretrained_cfg={k: v for k, v in cfg.items() if k != 'label_names'},
        num_labels=len(cfg.get('label_names') or ()),
        weights=published,
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0

    print(f'{args.model}: {params / 1e6:.3f} M params, {gmacs:.4f} GMACs at {"x".join(map(str, input_size))}')
    print('pretrained cfg:')
    for k, v in report['pretrained_cfg'].items():
        print(f'  {k}: {v}')
    if cfg.get('label_names'):
        names = list(cfg['label_names'])
        print(f'  label_names: {len(names)} ({", ".join(map(str, names[:5]))}{", …" if len(names) > 5 else ""})')
    if not published:
        print(f'weights: none published for {arch} (pretrained=True raises; see weights/manifest.json)')
    for t, w in published.items():
        print(f'weights {t}:')
        if not w:
            print('  registered with a weight source but not in the manifest (refused by pretrained=True)')
            continue
        print(f'  hub: hf-hub:{w["hf_hub_id"]} ({w["filename"]}, {w["size"]} bytes, sha256 {w["sha256"]})')
        print(f'  local copy: {w["local_file"] or "none (downloaded to the HF cache on first use)"}')
        print(f'  eval: {json.dumps(w["eval"])}')
        print(f'  provenance: {json.dumps(w["provenance"])}')
        print(f'  reproduce: {w["reproduce"]}')
    return 0
