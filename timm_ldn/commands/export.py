"""``ldn export``: a train.py checkpoint (or a state dict) → a Hub-ready folder + a weights manifest entry.

The folder holds ``model.safetensors``, timm's ``config.json`` (written by timm's own ``save_config_for_hf``, so
``timm.create_model('hf-hub:<repo>', pretrained=True)`` works) and a ``README.md`` model card. ``--push`` uploads
the folder with huggingface_hub's ``HfApi.upload_folder``; that call needs a token and network and is not
exercised by the test suite.
"""
import argparse
import datetime
import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['add_arguments', 'run', 'export_checkpoint', 'read_checkpoint']

EPILOG = """\
examples:
  ldn export output/train/model_best.pth.tar --model ldn_tiny.in1k --output export/ldn_tiny.in1k \\
      --eval top1=72.1 --eval top5=91.0 --eval-dataset imagenet-1k/val \\
      --recipe timm_ldn/recipes/in1k.yaml --data imagenet-1k \\
      --reproduce "python train.py --config timm_ldn/recipes/in1k.yaml ..."
  ldn export model_best.pth.tar --model ldn_nano.fmnist --labels labels.txt --local-copy ...

The tag must then be registered in timm_ldn/ldn.py default_cfgs with hf_hub_id=hub_id('<arch>.<tag>'); the
command prints the entry to paste when it is missing. The manifest entry is written to weights/manifest.json of
the checkout (or --manifest / $LDN_WEIGHTS_MANIFEST); the next release ships that file, and --local-copy files, in
the wheel. Exit code 0 on success, 2 on bad arguments / unusable checkpoint.
--push cannot be tested offline: it is one HfApi.create_repo + HfApi.upload_folder call.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('checkpoint', help='train.py checkpoint (checkpoint-*.pth.tar, model_best.pth.tar), a '
                                           'torch.save(state_dict) file or a .safetensors state dict')
    parser.add_argument('--model', required=True, metavar='ARCH.TAG',
                        help='registered architecture and the tag to publish, e.g. ldn_tiny.in1k')
    parser.add_argument('--output', '-o', help='output folder (default: export/<ARCH.TAG>)')
    parser.add_argument('--repo-id', help='Hub repo id (default: <HF_HUB_NAMESPACE>/<ARCH.TAG>)')
    parser.add_argument('--no-ema', action='store_true', help='export state_dict instead of state_dict_ema')
    parser.add_argument('--model-args', type=json.loads, default={}, metavar='JSON',
                        help='extra create_model kwargs of the trained model, e.g. \'{"embed_dim": 96}\'')
    data = parser.add_argument_group('preprocessing / labels (default: the registered cfg of ARCH.TAG or ARCH)')
    data.add_argument('--input-size', type=int, nargs=3, metavar=('C', 'H', 'W'))
    data.add_argument('--mean', type=float, nargs='+')
    data.add_argument('--std', type=float, nargs='+')
    data.add_argument('--crop-pct', type=float)
    data.add_argument('--interpolation', choices=('bilinear', 'bicubic', 'nearest'))
    data.add_argument('--labels', metavar='FILE', help='class names: a JSON list or one name per line')
    data.add_argument('--license', help='model license (default: the cfg\'s, apache-2.0)')
    prov = parser.add_argument_group('provenance and evaluation (recorded in the manifest and the model card)')
    prov.add_argument('--eval', action='append', default=[], metavar='METRIC=VALUE',
                      help='evaluation result, repeatable (e.g. top1=91.2); required unless the checkpoint '
                           'carries train.py\'s metric')
    prov.add_argument('--eval-dataset', default='', help='dataset/split the --eval numbers are on')
    prov.add_argument('--recipe', help='training recipe (file or description); default: from the checkpoint args')
    prov.add_argument('--data', help='training data; default: from the checkpoint args')
    prov.add_argument('--commit', help='git commit of the training code (default: HEAD of the current repo)')
    prov.add_argument('--reproduce', required=True, metavar='CMD', help='command that reproduces these weights')
    out = parser.add_argument_group('manifest / publishing')
    out.add_argument('--manifest', help='manifest to update (default: weights/manifest.json or '
                                        '$LDN_WEIGHTS_MANIFEST)')
    out.add_argument('--no-manifest', action='store_true', help='write the folder only')
    out.add_argument('--local-copy', action='store_true',
                     help='also copy model.safetensors next to the manifest (<ARCH.TAG>/model.safetensors) and '
                          'record it as local_file, so `ldn predict` works offline')
    out.add_argument('--push', action='store_true', help='upload the folder to the Hub (needs a token + network)')
    out.add_argument('--private', action='store_true', help='create the Hub repo private (with --push)')
    out.add_argument('--token', help='Hub token (default: huggingface_hub\'s login / HF_TOKEN)')


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint without executing pickled code (``weights_only=True``; train.py's args Namespace is
    the one allow-listed class)."""
    if str(path).endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(path, device='cpu')
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or train.py checkpoint.')
    return checkpoint


def git_commit(cwd: Optional[str] = None) -> str:
    """The checkout's HEAD commit (provenance of published weights), or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                              timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _read_labels(path: str) -> List[str]:
    text = Path(path).read_text(encoding='utf-8')
    if text.lstrip().startswith('['):
        return [str(x) for x in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_eval(items: List[str]) -> Dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--eval expects METRIC=VALUE, got {item!r}')
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}


def _model_card(entry: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    name, repo = entry['model'], entry['hf_hub_id']
    eval_rows = '\n'.join(f'| {k} | {v} |' for k, v in entry['eval'].items() if k != 'dataset')
    labels = cfg.get('label_names') or []
    return f"""---
tags:
- image-classification
- timm
- timm-ldn
library_name: timm
license: {cfg.get('license') or 'apache-2.0'}
---
# {name}

Linear Diffusion Network (LDN) image classifier: every layer is one explicit-Euler step of a diffusion over the
patch tokens (multi-scale grid Laplacian + linear-time diffusion attention + MLP). Paper: *{cfg.get('paper_name')}*.
Code: the `timm-ldn` package (`pip install timm-ldn`), which registers `ldn_*` architectures with timm.

## Model details
- architecture: `{entry['architecture']}`, extra args `{json.dumps(entry.get('model_args') or {})}`
- params: {entry['num_params'] / 1e6:.3f} M, GMACs: {entry['gmacs']:.4f} at input size {entry['input_size']}
- classes: {entry['num_classes']}{(' (' + ', '.join(map(str, labels[:10])) + (', …' if len(labels) > 10 else '') + ')') if labels else ''}
- preprocessing: mean {cfg.get('mean')}, std {cfg.get('std')}, crop_pct {cfg.get('crop_pct')}, {cfg.get('interpolation')}
- file: `{entry['filename']}`, {entry['size']} bytes, sha256 `{entry['sha256']}` (parameter layout v{entry['layout_version']})

## Results ({entry['eval'].get('dataset') or 'see provenance'})
| metric | value |
|---|---|
{eval_rows}

## Provenance
- recipe: {entry['provenance'].get('recipe')}
- data: {entry['provenance'].get('data')}
- code commit: `{entry['provenance'].get('commit')}`
- reproduce: `{entry['reproduce']}`

## Usage
```python
import timm, timm_ldn  # importing timm_ldn registers the LDN architectures

model = timm.create_model('{name}', pretrained=True).eval()   # sha256-verified against the project manifest
# or straight from this repo:  timm.create_model('hf-hub:{repo}', pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)
```
Command line: `ldn predict image.png --model {name}`, `ldn info {name}`.
"""


def write_hf_config(model: torch.nn.Module, path: Path) -> None:
    """timm's ``config.json`` (``save_config_for_hf``), with what transformers' ``TimmWrapper`` needs as well.

    * ``label_names`` at the top level: TimmWrapper builds ``id2label`` from there only (timm reads the copy in
      ``pretrained_cfg``); without it the pipeline answers ``LABEL_3``.
    * no ``num_classes`` in ``model_args``: TimmWrapper calls ``create_model(arch, num_classes=num_labels,
      **model_args)``, so a second ``num_classes`` is a TypeError; timm takes it from the top-level
      ``num_classes`` either way.
    """
    from timm.models._hub import save_config_for_hf
    from timm_ldn._checkpoint import LDN_LAYOUT_VERSION

    model_config: Dict[str, Any] = dict(ldn_layout_version=LDN_LAYOUT_VERSION)
    labels = model.pretrained_cfg.get('label_names')
    if labels and len(labels) == model.num_classes:
        model_config['label_names'] = list(labels)
    save_config_for_hf(model, path, model_config=model_config)
    config = json.loads(path.read_text(encoding='utf-8'))
    config.get('model_args', {}).pop('num_classes', None)
    path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')


def export_checkpoint(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the model from the checkpoint, write the Hub folder and return its manifest entry."""
    import safetensors.torch
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    from timm_ldn.hub import HF_HUB_NAMESPACE, WEIGHTS_FILENAME, hub_id, probe_input, sha256_file
    from timm_ldn._checkpoint import LDN_LAYOUT_VERSION, checkpoint_filter_fn, unwrap_checkpoint
    from .info import model_stats

    arch, tag = split_model_name_tag(args.model)
    if not tag:
        raise ValueError(f'--model needs a tag to publish under: {arch}.<tag> (e.g. {arch}.in1k)')
    if not timm.is_model(arch):
        raise ValueError(f'Unknown architecture {arch!r}; LDN models: {", ".join(timm.list_models("ldn_*"))}')
    name = f'{arch}.{tag}'
    repo_id = args.repo_id or hub_id(name)
    checkpoint = read_checkpoint(args.checkpoint)
    if args.no_ema:  # hide the EMA so checkpoint_filter_fn picks the raw weights
        checkpoint = {k: v for k, v in checkpoint.items() if k not in ('state_dict_ema', 'model_ema')}

    # infer head / stem sizes from the weights so a checkpoint with a custom head exports as trained
    flat = unwrap_checkpoint(checkpoint)
    kwargs = dict(args.model_args)
    if 'head.fc.weight' in flat:
        kwargs.setdefault('num_classes', int(flat['head.fc.weight'].shape[0]))
    if 'patch_embed.proj.weight' in flat:
        kwargs.setdefault('in_chans', int(flat['patch_embed.proj.weight'].shape[1]))

    registered = True
    try:
        base_cfg = get_pretrained_cfg(name).to_dict()
    except RuntimeError:
        registered = False
        base_cfg = (get_pretrained_cfg(arch) or timm.models.PretrainedCfg()).to_dict()
    overlay: Dict[str, Any] = dict(tag=tag, hf_hub_id=repo_id)
    if args.input_size:
        overlay['input_size'] = tuple(args.input_size)
    elif 'in_chans' in kwargs:
        overlay['input_size'] = (kwargs['in_chans'], *base_cfg.get('input_size', (3, 224, 224))[1:])
    for key in ('mean', 'std'):
        if getattr(args, key):
            overlay[key] = tuple(getattr(args, key))
    if args.crop_pct:
        overlay['crop_pct'] = args.crop_pct
    if args.interpolation:
        overlay['interpolation'] = args.interpolation
    if args.license:
        overlay['license'] = args.license
    if args.labels:
        overlay['label_names'] = tuple(_read_labels(args.labels))
    if 'num_classes' in kwargs:
        overlay['num_classes'] = kwargs['num_classes']
    labels = overlay.get('label_names', base_cfg.get('label_names'))
    if labels and 'num_classes' in kwargs and len(labels) != kwargs['num_classes']:
        raise ValueError(f'{len(labels)} label names for a {kwargs["num_classes"]}-class head.')

    # provenance first: fail before anything is written
    train_args = vars(checkpoint['args']) if isinstance(checkpoint.get('args'), argparse.Namespace) else {}
    evals = _parse_eval(args.eval)
    if not evals and checkpoint.get('metric') is not None:
        evals['checkpoint_metric'] = float(checkpoint['metric'])  # train.py's eval metric of this checkpoint
    if not evals:
        raise ValueError('No evaluation result: pass --eval METRIC=VALUE (and --eval-dataset).')
    if args.eval_dataset:
        evals['dataset'] = args.eval_dataset
    recipe = args.recipe or train_args.get('config') or (
        ' '.join(f'--{k} {v}' for k, v in sorted(_jsonable(train_args).items())) if train_args else None)
    data = args.data or train_args.get('dataset') or train_args.get('data_dir')
    if not recipe or not data:
        raise ValueError('Provenance incomplete: pass --recipe and --data (the checkpoint carries no train args).')

    model = timm.create_model(
        name if registered else arch, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    model.eval()
    cfg = model.pretrained_cfg
    # token grid of the exported input size (the registered cfg's pool_size is for its own input size)
    cfg['pool_size'] = tuple(s // p for s, p in zip(cfg['input_size'][1:], model.patch_size))

    out_dir = Path(args.output or Path('export') / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / WEIGHTS_FILENAME
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes metadata in hash-map order, so more keys would make the bytes (and
    # the manifest sha256) differ between runs; the layout version lives in config.json and the manifest
    safetensors.torch.save_file(tensors, str(weights_path), metadata={'format': 'pt'})
    weights_path.chmod(0o644)  # safetensors writes 0600; a published / shipped file is world-readable
    write_hf_config(model, out_dir / 'config.json')

    input_size = tuple(cfg['input_size'])
    params, gmacs = model_stats(model, input_size)
    # one thread: the CPU kernels (and the diffusion step's implementation, see diffusion_step) depend on the
    # thread count, and the fingerprint is bitwise; a 1-thread run anywhere on this kind of CPU reproduces it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(probe_input(input_size))[0].float()
    finally:
        torch.set_num_threads(threads)
    top = torch.topk(logits, min(5, logits.numel()))

    entry: Dict[str, Any] = dict(
        model=name,
        architecture=arch,
        hf_hub_id=repo_id,
        filename=WEIGHTS_FILENAME,
        sha256=sha256_file(weights_path),
        size=weights_path.stat().st_size,
        layout_version=LDN_LAYOUT_VERSION,
        num_params=params,
        gmacs=round(gmacs, 6),
        input_size=list(input_size),
        num_classes=model.num_classes,
        model_args={k: v for k, v in kwargs.items() if k not in ('num_classes', 'in_chans')},
        provenance=dict(
            recipe=str(recipe),
            data=str(data),
            commit=args.commit or git_commit(),
            checkpoint=Path(args.checkpoint).name,
            epoch=checkpoint.get('epoch'),
            ema=not args.no_ema and isinstance(checkpoint.get('state_dict_ema'), dict),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        ),
        eval=evals,
        reproduce=args.reproduce,
        probe=dict(
            input='timm_ldn.hub.probe_input(input_size)',
            logits_sha256=hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            top5=[[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        ),
    )
    (out_dir / 'README.md').write_text(_model_card(entry, cfg), encoding='utf-8')
    entry['_registered'] = registered and (cfg.get('hf_hub_id') == repo_id)
    entry['_namespace_ok'] = repo_id.startswith(HF_HUB_NAMESPACE + '/')
    return entry




def _push(out_dir: Path, repo_id: str, token: Optional[str], private: bool) -> str:
    # deliberately thin: huggingface_hub's own API does auth, LFS and retries (not testable offline)
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), commit_message=f'Add {out_dir.name}')
    return str(getattr(info, 'commit_url', info))


def run(args: argparse.Namespace) -> int:
    import timm_ldn  # noqa: F401  registers ldn_* with timm
    from timm_ldn.hub import add_manifest_entry, is_packaged_weights_dir, manifest_path

    if not args.no_manifest and not args.manifest and is_packaged_weights_dir(manifest_path().parent):
        # a wheel's copy is rebuilt from the repository's weights/ at every release: an entry added here is lost
        print(f'ldn export: the default manifest {manifest_path()} belongs to an installed wheel. Run ldn export '
              f'in a checkout of timm-ldn (it writes weights/manifest.json, which the next release ships), or pass '
              f'--manifest / --no-manifest.', file=sys.stderr)
        return 2
    try:
        entry = export_checkpoint(args)
    except pickle.UnpicklingError as e:  # weights_only=True refused a pickled object: never run checkpoint code
        print(f'ldn export: {args.checkpoint} contains pickled objects beyond tensors and train.py args; refusing '
              f'to unpickle them ({e}). Re-save the state dict or export to safetensors.', file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        print(f'ldn export: {e}', file=sys.stderr)
        return 2
    registered, namespace_ok = entry.pop('_registered'), entry.pop('_namespace_ok')
    out_dir = Path(args.output or Path('export') / entry['model'])
    print(f'wrote {out_dir}/ (model.safetensors {entry["size"]} bytes, sha256 {entry["sha256"]}, config.json, '
          f'README.md): {entry["num_params"] / 1e6:.3f} M params, {entry["gmacs"]:.4f} GMACs')

    if not args.no_manifest:
        if not namespace_ok:
            print(f'note: {entry["hf_hub_id"]} is outside the project namespace; pretrained=True only verifies '
                  'files of the project namespace.', file=sys.stderr)
        path = Path(args.manifest) if args.manifest else manifest_path()
        if args.local_copy:
            local = path.parent / entry['model'] / entry['filename']
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_dir / entry['filename'], local)
            entry['local_file'] = local.relative_to(path.parent).as_posix()
        add_manifest_entry(entry, path)
        print(f'manifest entry {entry["model"]} written to {path}')
    if not registered:
        print(f"register the tag in timm_ldn/ldn.py default_cfgs (pretrained=True needs it):\n"
              f"    '{entry['model']}': _cfg(hf_hub_id=hub_id('{entry['model']}'), ...),  "
              f"# input_size/mean/std/crop_pct/label_names as in {out_dir}/config.json")
    if args.push:
        try:
            print(f'pushed: {_push(out_dir, entry["hf_hub_id"], args.token, args.private)}')
        except Exception as e:  # auth / network: report, the folder and manifest are still valid
            print(f'ldn export: push to {entry["hf_hub_id"]} failed: {type(e).__name__}: {e}', file=sys.stderr)
            return 1
    return 0
