""" Client half of .ci/release_check.py: runs inside the fresh venv that holds only the built timm-ldn wheel.

The release check copies this file out of the checkout and runs it from a folder outside it, so nothing of the
checkout is importable. Prints one JSON line per check: {"check": name, "ok": bool, ...}.

usage: python release_client.py isolation|online|offline|tampered PROJECT_DIR EXPECTED_MANIFEST

EXPECTED_MANIFEST is a copy of the checkout's weights/manifest.json: its tags are the ones that must load; the
installed package must find its own manifest (a tag it does not know is refused, and that fails the check).
"""
import importlib.metadata
import json
import os
import sys
import traceback
from pathlib import Path


def report(check: str, ok: bool, **detail) -> None:
    print(json.dumps(dict(check=check, ok=ok, **detail), default=str), flush=True)


def attempt(check: str, fn) -> None:
    try:
        report(check, **fn())
    except Exception as e:  # the check reports any failure with its type and message
        report(check, False, error=f'{type(e).__name__}: {e}', trace=traceback.format_exc()[-1500:])


def isolation(project: Path) -> dict:
    """`import timm` alone registers ldn_*, and everything timm-ldn comes from this venv, nothing from the checkout."""
    import timm  # no `import timm_ldn`: the wheel's start-up hook must do it
    models = timm.list_models('ldn_*')
    import timm_ldn
    import _timm_ldn_autoregister
    from timm_ldn.hub import manifest_path
    venv = Path(sys.prefix).resolve()
    dist = importlib.metadata.distribution('timm-ldn')
    where = {
        'timm_ldn': Path(timm_ldn.__file__).resolve(),
        'hook': Path(_timm_ldn_autoregister.__file__).resolve(),
        'manifest': manifest_path().resolve(),
        'dist_info': Path(dist.locate_file('')).resolve(),
    }
    leaks = [p for p in sys.path if p and Path(p).resolve().is_relative_to(project)]
    outside = {k: str(v) for k, v in where.items() if not v.is_relative_to(venv)}
    ok = ('ldn_small' in models and not leaks and not outside and timm_ldn.__version__ == dist.version)
    return dict(ok=ok, models=models, checkout_on_sys_path=leaks, not_from_venv=outside,
                version=timm_ldn.__version__, dist_version=dist.version, manifest=str(where['manifest']))


def _probe_matches(model, entry: dict) -> bool:
    import torch
    from timm_ldn.hub import probe_input
    with torch.no_grad():
        logits = model.eval()(probe_input(tuple(entry['input_size'])))[0]
    want = entry.get('probe', {}).get('top5')
    if not want:
        return True
    top = torch.topk(logits, len(want))
    return ([int(i) for i in top.indices] == [i for i, _ in want]
            and torch.allclose(top.values, torch.tensor([v for _, v in want]), atol=1e-4))


def load_every_tag(phase: str, expected: dict) -> None:
    """pretrained=True and hf-hub: for every manifest tag; the loaded file must be the Hub download in HF_HOME."""
    import timm
    hf_home = Path(os.environ['HF_HOME']).resolve()
    for name, entry in expected['weights'].items():
        if entry['architecture'] == SEQUENCE:
            attempt(f'{phase}:load_published:{name}', lambda name=name: sequence_loads(name, hf_home))
            continue
        for label, model_name in (('pretrained', name), ('hf_hub', f'hf-hub:{entry["hf_hub_id"]}')):
            def load(model_name=model_name, entry=entry):
                model = timm.create_model(model_name, pretrained=True)
                file = Path(model.pretrained_cfg.get('file') or '').resolve()
                from_cache = file.is_relative_to(hf_home)
                probe = _probe_matches(model, entry)
                return dict(ok=from_cache and probe, file=str(file), from_hub_cache=from_cache, probe_matches=probe)
            attempt(f'{phase}:{label}:{name}', load)
        if phase == 'online':
            attempt(f'{phase}:transformers:{name}', lambda entry=entry: transformers_loads(entry))


SEQUENCE = 'LdnSequenceClassifier'  # manifest architecture of non-timm sequence models


def sequence_loads(name: str, hf_home: Path) -> dict:
    """timm_ldn.sequence.load_published: the verified Hub snapshot in HF_HOME, rebuilt from its config.json."""
    import torch
    from timm_ldn.hub import verified_snapshot
    from timm_ldn.sequence import load_published
    folder = verified_snapshot(name).resolve()
    model = load_published(name).eval()
    x = torch.randint(1, model.vocab_size, (2, 32)) if model.vocab_size else torch.randn(2, 32, model.in_features)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(x)).all())
    from_cache = folder.is_relative_to(hf_home)
    return dict(ok=from_cache and finite, folder=str(folder), from_hub_cache=from_cache, finite=finite)


def transformers_loads(entry: dict) -> dict:
    """transformers' TimmWrapper on the Hub repo `ldn export` wrote: same logits as timm, pipeline labels."""
    try:
        import transformers  # optional extra
    except ImportError:
        return dict(ok=True, skipped='transformers not installed')
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from timm_ldn.hub import probe_input, samples_dir
    repo = entry['hf_hub_id']
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(repo).eval()
    ref = timm.create_model(entry['model'], pretrained=True).eval()
    x = probe_input(tuple(entry['input_size']))
    with torch.no_grad():
        same = torch.allclose(hf_model(pixel_values=x).logits, ref(x), atol=1e-5)
    classify = transformers.pipeline('image-classification', model=repo)
    samples = json.loads((samples_dir() / 'samples.json').read_text())
    agree = None
    if samples.get('model') == entry['model']:
        # the pipeline turns paths and PIL images into RGB; a 1-channel model needs the pixels as an array
        gray = entry['input_size'][0] == 1
        names = ref.pretrained_cfg['label_names']
        hits = []
        for file, info in samples['images'].items():
            image = Image.open(samples_dir() / file)
            pixels = np.asarray(image.convert('L'))[..., None] if gray else str(samples_dir() / file)  # (H, W, 1)
            top = classify(pixels, top_k=1)[0]
            hits.append(top['label'] == names[info['predicted']])
        agree = sum(hits) / len(hits)
    return dict(ok=same and agree in (None, 1.0), same_logits_as_timm=same, pipeline_agrees_with_ldn=agree)


def tampered(expected: dict) -> None:
    """The Hub serves altered bytes for every tag: pretrained=True / hf-hub: refuse them (ChecksumError)."""
    import timm
    from timm_ldn.hub import ChecksumError
    for name, entry in expected['weights'].items():
        if entry['architecture'] == SEQUENCE:
            attempt(f'tampered:load_published:{name}', lambda name=name: sequence_refuses_altered(name))
            continue
        for label, model_name in (('pretrained', name), ('hf_hub', f'hf-hub:{entry["hf_hub_id"]}')):
            def load(model_name=model_name):
                try:
                    timm.create_model(model_name, pretrained=True)
                except ChecksumError as e:
                    return dict(ok=True, refused=str(e)[:160])
                return dict(ok=False, error='altered weights were loaded')
            attempt(f'tampered:{label}:{name}', load)


def sequence_refuses_altered(name: str) -> dict:
    """Altered Hub bytes are refused (ChecksumError); load_published then loads the verified shipped copy."""
    import torch
    from safetensors.torch import load_file
    from timm_ldn.hub import ChecksumError, local_weight_file, verified_snapshot
    from timm_ldn.sequence import load_published
    try:
        verified_snapshot(name)
        return dict(ok=False, error='altered weights passed verification')
    except ChecksumError as e:
        refused = str(e)[:160]
    shipped = load_file(str(local_weight_file(name)))
    state = load_published(name).state_dict()
    # the first published file keeps the old 'encoder.' key layout, which the classifier maps on load
    same = all(torch.equal(state[k.removeprefix('encoder.')], v) for k, v in shipped.items())
    return dict(ok=same, refused=refused, loaded_verified_shipped_copy=same)


def main() -> None:
    phase, project = sys.argv[1], Path(sys.argv[2]).resolve()
    expected = json.loads(Path(sys.argv[3]).read_text(encoding='utf-8'))
    if phase == 'isolation':
        attempt('isolation', lambda: isolation(project))
    elif phase in ('online', 'offline'):
        load_every_tag(phase, expected)
    elif phase == 'tampered':
        tampered(expected)


if __name__ == '__main__':
    main()
