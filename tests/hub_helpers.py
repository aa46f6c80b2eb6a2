""" Test helpers for the pretrained-weights tests: a loopback Hugging Face Hub and a test-only LDN tag.

* ``LoopbackHub``: an HTTP server on 127.0.0.1 answering the Hub's file-resolve requests
  (``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``) with what huggingface_hub's ``hf_hub_download``
  needs: ``ETag`` (the sha256, which also names the cached blob), ``X-Repo-Commit``, ``Content-Length``, and
  the Hub's ``X-Error-Code`` on 404. Files can be served corrupted, truncated or cut off mid-transfer.
* ``ldn_hubtest``: a tiny LDN (32 px, 3 blocks, C=32) registered with pretrained tags only when this module is
  imported, so the user-facing registry never shows test weights. Its tags go through the real ``_create_ldn``.
"""
import argparse
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from timm.models import generate_default_cfgs, register_model

from timm_ldn.hub import hub_id
from timm_ldn.ldn import LinearDiffusionNet, _cfg, _create_ldn

ARCH = 'ldn_hubtest'
NUM_CLASSES = 10
LABELS = tuple(f'class_{i}' for i in range(NUM_CLASSES))
MODEL_ARGS = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
# tag -> what the loopback Hub serves for it (see write_fixture_repos)
GOOD, CORRUPT, TRUNCATED, CUTOFF, OTHER_ARCH, UNLISTED, NO_WEIGHTS = (
    'loopback', 'corrupt', 'truncated', 'cutoff', 'otherarch', 'unlisted', 'noweights')


def _test_cfg(tag: Optional[str]) -> dict:
    hub = dict(hf_hub_id=hub_id(f'{ARCH}.{tag}')) if tag else {}
    return _cfg(
        input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, interpolation='bilinear',
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=NUM_CLASSES, label_names=LABELS, **hub)


default_cfgs = generate_default_cfgs({
    **{f'{ARCH}.{t}': _test_cfg(t) for t in (GOOD, CORRUPT, TRUNCATED, CUTOFF, OTHER_ARCH, UNLISTED)},
    f'{ARCH}.{NO_WEIGHTS}': _test_cfg(None),
})


@register_model
def ldn_hubtest(pretrained: bool = False, **kwargs) -> LinearDiffusionNet:
    """Test-only tiny LDN (registered by importing tests/hub_helpers.py)."""
    return _create_ldn(ARCH, pretrained=pretrained, **dict(MODEL_ARGS, **kwargs))


def make_train_checkpoint(path: Path, seed: int = 0) -> None:
    """A checkpoint shaped like timm train.py's: DDP-prefixed state_dict, an EMA, args Namespace, metric."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(ARCH)
    with torch.no_grad():  # move the params off their init so a head reset / random init is detectable
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = model.state_dict()
    raw = {'module.' + k: v + 1. for k, v in ema.items()}  # differs from the EMA: export must pick the EMA
    torch.save(dict(
        epoch=7, arch=ARCH, state_dict=raw, state_dict_ema=ema, metric=81.5, version=2,
        args=argparse.Namespace(model=ARCH, epochs=8, lr=1e-3, dataset='synthetic', data_dir='/data')), path)


def probe_reference(checkpoint: Path) -> torch.Tensor:
    """Logits of the checkpoint's EMA weights on the manifest probe input, computed without any Hub code."""
    import timm
    from timm_ldn.hub import probe_input
    from timm_ldn._checkpoint import checkpoint_filter_fn
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    model = timm.create_model(ARCH).eval()
    model.load_state_dict(checkpoint_filter_fn(ckpt, model))
    with torch.no_grad():
        return model(probe_input((3, 32, 32)))


def write_fixture_repos(root: Path) -> Dict[str, Path]:
    """Export the test checkpoint with ``ldn export`` and build the broken variants the Hub will serve.

    Returns paths: 'checkpoint', 'export' (the good Hub folder), 'manifest', 'otherarch' (foreign weights).
    The manifest lists the good file for GOOD/CORRUPT/TRUNCATED/CUTOFF (the server breaks the bytes in
    transit or at rest) and the foreign file for OTHER_ARCH; UNLISTED is deliberately absent.
    """
    import safetensors.torch
    from timm_ldn.cli import main as ldn_main
    from timm_ldn.hub import add_manifest_entry, load_manifest, sha256_file

    root.mkdir(parents=True, exist_ok=True)
    ckpt, export_dir, manifest = root / 'model_best.pth.tar', root / 'export', root / 'weights' / 'manifest.json'
    make_train_checkpoint(ckpt)
    rc = ldn_main([
        'export', str(ckpt), '--model', f'{ARCH}.{GOOD}', '--output', str(export_dir), '--manifest', str(manifest),
        '--local-copy', '--eval', 'top1=81.5', '--eval-dataset', 'synthetic/val', '--recipe', 'tests/hub_helpers.py',
        '--commit', '0' * 40, '--reproduce', 'python -m pytest tests/test_hub.py'])
    assert rc == 0, rc
    good = load_manifest(manifest)['weights'][f'{ARCH}.{GOOD}']
    for tag in (CORRUPT, TRUNCATED, CUTOFF):
        add_manifest_entry(dict(good, model=f'{ARCH}.{tag}', hf_hub_id=hub_id(f'{ARCH}.{tag}'), local_file=None),
                           manifest)
    other = root / 'otherarch.safetensors'  # a small conv net's weights, as if a resnet checkpoint was uploaded
    safetensors.torch.save_file({
        'conv1.weight': torch.randn(8, 3, 3, 3), 'fc.weight': torch.randn(NUM_CLASSES, 8),
        'fc.bias': torch.zeros(NUM_CLASSES)}, str(other))
    add_manifest_entry(dict(good, model=f'{ARCH}.{OTHER_ARCH}', hf_hub_id=hub_id(f'{ARCH}.{OTHER_ARCH}'),
                            sha256=sha256_file(other), size=other.stat().st_size, local_file=None), manifest)
    return dict(checkpoint=ckpt, export=export_dir, manifest=manifest, otherarch=other)


def hub_files(paths: Dict[str, Path]) -> Dict[Tuple[str, str], bytes]:
    """(repo_id, filename) -> bytes served by the loopback Hub for every test tag."""
    good = {f: (paths['export'] / f).read_bytes() for f in ('model.safetensors', 'config.json', 'README.md')}
    weights = bytearray(good['model.safetensors'])
    weights[-64:] = bytes(b ^ 0xFF for b in weights[-64:])  # same size, still parseable, different tensors
    files = {}
    for tag, blob in ((GOOD, good['model.safetensors']), (CORRUPT, bytes(weights)),
                      (TRUNCATED, good['model.safetensors'][:len(weights) // 2]),
                      (CUTOFF, good['model.safetensors']), (OTHER_ARCH, paths['otherarch'].read_bytes()),
                      (UNLISTED, good['model.safetensors'])):
        repo = hub_id(f'{ARCH}.{tag}')
        files[(repo, 'model.safetensors')] = blob
        files[(repo, 'config.json')] = good['config.json']
    return files


class LoopbackHub:
    """Minimal Hub file-resolve endpoint on 127.0.0.1 for huggingface_hub's real client.

    ``cutoff_repos``: repos whose GET body stops half-way while ``Content-Length`` announces the full file
    (a dropped connection); the client's resume request (``Range``) is answered 416 so it fails fast.
    """

    def __init__(self, files: Dict[Tuple[str, str], bytes], cutoff_repos: Tuple[str, ...] = ()):
        self.files = files
        self.cutoff_repos = set(cutoff_repos)
        self.failing_repos = set()
        self.requests = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self._resolve(send_body=False)

            def do_GET(self):
                self._resolve(send_body=True)

            def _resolve(self, send_body: bool):
                hub.requests.append((self.command, self.path))
                m = re.fullmatch(r'/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self.path.split('?')[0])
                repo = m and m['repo']
                known_repo = bool(repo) and any(r == repo for r, _ in hub.files)
                data = hub.files.get((repo, m['file'])) if m else None
                if data is None:
                    self.send_response(404)
                    self.send_header('X-Error-Code', 'EntryNotFound' if known_repo else 'RepoNotFound')
                    if known_repo:
                        self.send_header('X-Repo-Commit', hub.commit(repo))
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                if self.headers.get('Range') or (send_body and repo in hub.failing_repos):
                    self.send_response(416 if self.headers.get('Range') else 500)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header('Content-Type', 'application/octet-stream')
                self.send_header('Content-Length', str(len(data)))
                self.send_header('ETag', '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header('X-Repo-Commit', hub.commit(repo))
                self.end_headers()
                if send_body:
                    if repo in hub.cutoff_repos:
                        # first transfer drops half-way; the client's retries then see a server error, so the
                        # test does not wait through huggingface_hub's 5 resume attempts
                        hub.cutoff_repos.discard(repo)
                        hub.failing_repos.add(repo)
                        self.wfile.write(data[:len(data) // 2])
                        self.close_connection = True
                    else:
                        self.wfile.write(data)

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def commit(self, repo: str) -> str:
        """Stable fake commit sha of a repo: sha1 of its file names and contents."""
        h = hashlib.sha1()
        for (r, f), data in sorted(self.files.items()):
            if r == repo:
                h.update(f.encode() + hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}'

    def __enter__(self) -> 'LoopbackHub':
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def client_env(base: dict, endpoint: Optional[str], hf_home: Path, manifest: Path) -> dict:
    """Environment for a client subprocess: huggingface_hub reads HF_* once, at import."""
    env = {k: v for k, v in base.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
    env.update(HF_HOME=str(hf_home), LDN_WEIGHTS_MANIFEST=str(manifest), HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', HF_HUB_DISABLE_XET='1', TOKENIZERS_PARALLELISM='false',
               OMP_NUM_THREADS='1')
    if endpoint:
        env['HF_ENDPOINT'] = endpoint
    else:
        env['HF_HUB_OFFLINE'] = '1'
    return env


def load_json_lines(text: str) -> dict:
    """Collect the client's ``{"check": ..., ...}`` result lines into a dict keyed by check name."""
    out = {}
    for line in text.splitlines():
        if line.startswith('{"check"'):
            d = json.loads(line)
            out[d.pop('check')] = d
    return out
