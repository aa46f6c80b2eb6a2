""" Client side of the loopback-Hub tests, run in a subprocess so huggingface_hub reads HF_ENDPOINT / HF_HOME /
HF_HUB_OFFLINE at import like in a user's process. Prints one JSON line per check; test_hub.py asserts on them.

usage: python tests/hub_client.py online|offline CHECKPOINT EXPORT_DIR
"""
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import timm

import hub_helpers as H  # registers the test-only ldn_hubtest tags
from timm_ldn.hub import load_manifest, probe_input, sha256_file


def report(check: str, **result) -> None:
    print(json.dumps(dict(check=check, **result), default=str), flush=True)


def attempt(check: str, fn) -> None:
    """Run fn() -> dict of results; an exception is a result too (type + message)."""
    try:
        report(check, ok=True, **(fn() or {}))
    except Exception as e:  # the tests assert on the error type / message
        report(check, ok=False, error=type(e).__name__, message=str(e), trace=traceback.format_exc()[-2000:])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(probe_input((3, 32, 32)))


def cache_state() -> dict:
    """Every file under the HF cache: no temp files, and every blob's sha256 equals its name (the ETag)."""
    hub_cache = Path(os.environ['HF_HOME']) / 'hub'
    files = [p for p in hub_cache.rglob('*') if p.is_file() or p.is_symlink()]
    incomplete = [str(p) for p in files if p.name.endswith('.incomplete')]
    bad_blobs = [str(p) for p in files if p.parent.name == 'blobs' and len(p.name) == 64 and sha256_file(p) != p.name]
    dangling = [str(p) for p in files if p.is_symlink() and not p.exists()]
    weights = sorted(str(p.relative_to(hub_cache)) for p in files if p.name == 'model.safetensors')
    return dict(incomplete=incomplete, bad_blobs=bad_blobs, dangling=dangling, weights=weights)


def main() -> None:
    phase, ckpt, export_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    manifest = load_manifest()
    entry = manifest['weights'][f'{H.ARCH}.{H.GOOD}']
    reference = H.probe_reference(ckpt)  # exporter's weights, no Hub code involved
    tag = f'{H.ARCH}.{H.GOOD}'

    def registry_tag():
        model = timm.create_model(tag, pretrained=True)
        out = logits_of(model)
        return dict(equal=torch.equal(out, reference),
                    probe_sha_match=sha256_file_bytes(out[0]) == entry['probe']['logits_sha256'],
                    file=model.pretrained_cfg.get('file'), labels=list(model.pretrained_cfg['label_names'])[:2])

    def hf_hub_prefix():
        model = timm.create_model(f'hf-hub:{entry["hf_hub_id"]}', pretrained=True)
        return dict(equal=torch.equal(logits_of(model), reference), num_classes=model.num_classes,
                    file=model.pretrained_cfg.get('file'))

    attempt('pretrained', registry_tag)
    attempt('hf_hub', hf_hub_prefix)
    if phase == 'offline':
        attempt('not_cached', lambda: timm.create_model(f'{H.ARCH}.{H.CORRUPT}', pretrained=True) and {})
        report('cache', **cache_state())
        return

    pretrained = timm.create_model(tag, pretrained=True).eval()
    sd = pretrained.state_dict()

    def overlay_file():
        model = timm.create_model(tag, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(export_dir / 'model.safetensors')))
        return dict(equal=torch.equal(logits_of(model), reference))

    def features_only():
        model = timm.create_model(tag, pretrained=True, features_only=True, out_indices=(1, 2))
        with torch.no_grad():
            feats = model(probe_input((3, 32, 32)))
            want = pretrained.forward_intermediates(probe_input((3, 32, 32)), indices=(1, 2), intermediates_only=True)
        return dict(n=len(feats), equal=all(torch.equal(a, b) for a, b in zip(feats, want)),
                    shapes=[list(f.shape) for f in feats])

    def in_chans_1():
        model = timm.create_model(tag, pretrained=True, in_chans=1)
        w = model.patch_embed.proj.weight
        return dict(shape=list(w.shape), summed=torch.allclose(w, sd['patch_embed.proj.weight'].sum(1, keepdim=True)),
                    runs=list(model.eval()(torch.zeros(1, 1, 32, 32)).shape))

    def num_classes_5():
        model = timm.create_model(tag, pretrained=True, num_classes=5)
        kept = all(torch.equal(v, sd[k]) for k, v in model.state_dict().items() if not k.startswith('head.fc'))
        return dict(out=list(model.eval()(torch.zeros(1, 3, 32, 32)).shape), backbone_equal=kept)

    attempt('overlay_file', overlay_file)
    attempt('features_only', features_only)
    attempt('in_chans_1', in_chans_1)
    attempt('num_classes_5', num_classes_5)
    for t in (H.CORRUPT, H.TRUNCATED, H.CUTOFF, H.UNLISTED, H.NO_WEIGHTS):
        attempt(t, lambda t=t: timm.create_model(f'{H.ARCH}.{t}', pretrained=True) and {})
    attempt('otherarch', lambda: timm.create_model(f'{H.ARCH}.{H.OTHER_ARCH}', pretrained=True) and {})
    attempt('otherarch_new_head', lambda: timm.create_model(
        f'{H.ARCH}.{H.OTHER_ARCH}', pretrained=True, num_classes=5) and {})
    truncated = Path(os.environ['HF_HOME']).parent / 'truncated.safetensors'
    truncated.write_bytes((export_dir / 'model.safetensors').read_bytes()[:5000])
    attempt('overlay_truncated', lambda: timm.create_model(
        tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated))) and {})
    report('cache', **cache_state())


def sha256_file_bytes(t: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(t.float().numpy().tobytes()).hexdigest()


if __name__ == '__main__':
    main()
