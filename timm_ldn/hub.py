""" Published LDN weights: Hub namespace, the weights manifest, and verified pretrained loading.

timm does the downloading (``timm.models._hub.download_from_hf``, i.e. ``huggingface_hub.hf_hub_download`` with
its cache) and the loading (``load_pretrained`` → ``load_state_dict``: safetensors, or pickle with
``weights_only=True``). This module only adds what timm lacks for a project that publishes its own weights:

* one place for the Hub namespace (``HF_HUB_NAMESPACE``), so repo ids are ``<namespace>/<model>.<tag>``;
* ``weights/manifest.json``: every published file with its sha256, size and provenance (schema in
  ``weights/README.md`` and ``MANIFEST_SCHEMA`` below);
* ``resolve_pretrained_overlay``: called by ``_create_ldn`` before timm loads. It refuses tags without
  weights (timm would fall back to random init or fail with a generic message), fetches a published
  file through timm, checks its sha256 against the manifest, and hands timm the verified local path.
"""
import functools
import hashlib
import json
import logging
import os
import socket
import struct
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

__all__ = [
    'HF_HUB_NAMESPACE', 'WEIGHTS_FILENAME', 'MANIFEST_ENV', 'MANIFEST_SCHEMA_VERSION', 'WeightsError',
    'ChecksumError', 'NoPretrainedWeightsError', 'hub_id', 'manifest_path', 'load_manifest', 'save_manifest',
    'add_manifest_entry', 'find_entry', 'sha256_file', 'verify_file', 'check_weight_file', 'tags_with_weights',
    'resolve_pretrained_overlay', 'local_weight_file', 'probe_input', 'weights_dir', 'samples_dir',
    'is_packaged_weights_dir', 'verified_snapshot',
]

_logger = logging.getLogger(__name__)

# The project's Hugging Face Hub namespace: the only place it is spelled out.
HF_HUB_NAMESPACE = 'timm-ldn'
WEIGHTS_FILENAME = 'model.safetensors'
# Point at another manifest (tests, forks).
MANIFEST_ENV = 'LDN_WEIGHTS_MANIFEST'
MANIFEST_SCHEMA_VERSION = 1

# Required keys of one manifest entry and their JSON types (documented in weights/README.md).
MANIFEST_SCHEMA: Dict[str, Any] = {
    'model': str,            # timm name with tag, 'ldn_tiny.in1k'
    'architecture': str,     # registered timm architecture, 'ldn_tiny'
    'hf_hub_id': str,        # '<HF_HUB_NAMESPACE>/<model>'
    'filename': str,         # file inside the Hub repo, 'model.safetensors'
    'sha256': str,           # hex digest of that file
    'size': int,             # bytes
    'layout_version': int,   # _checkpoint.LDN_LAYOUT_VERSION of the parameter layout
    'provenance': dict,      # recipe, data, commit (+ checkpoint, epoch, created)
    'eval': dict,            # evaluation result(s)
    'reproduce': str,        # command that reproduces the weights / the evaluation
}


class WeightsError(RuntimeError):
    """A pretrained weight cannot be used (missing, unverifiable, unreadable)."""


class ChecksumError(WeightsError):
    """A weight file does not match the sha256 / size recorded in the manifest."""


class NoPretrainedWeightsError(WeightsError):
    """``pretrained=True`` for a model / tag that has no published weights."""


def hub_id(model_name: str) -> str:
    """Hub repo id of a published ``<architecture>.<tag>``."""
    return f'{HF_HUB_NAMESPACE}/{model_name}'


def weights_dir() -> Path:
    """The project's ``weights/`` folder (manifest, shipped weights, sample images) in this install.

    There is one copy in the source tree, ``weights/`` at the repository root; a wheel (built directly or from
    the sdist) carries it as package data in ``timm_ldn/weights/`` (``setup.py``). A checkout and an editable
    install have no ``timm_ldn/weights/``, so they read the repository's folder, which ``ldn export`` updates.
    """
    package = Path(__file__).resolve().parent
    packaged = package / 'weights'
    return packaged if packaged.is_dir() else package.parent / 'weights'


def is_packaged_weights_dir(path: Union[str, Path]) -> bool:
    """True for the read-only copy inside an installed wheel (not a place to write new manifest entries)."""
    return Path(path).resolve() == Path(__file__).resolve().parent / 'weights'


def manifest_path() -> Path:
    """The manifest in use: ``$LDN_WEIGHTS_MANIFEST``, else ``manifest.json`` of :func:`weights_dir`."""
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env)
    return weights_dir() / 'manifest.json'


def samples_dir() -> Path:
    """Sample images shipped with the package (``ldn predict --samples``)."""
    return weights_dir() / 'samples'


def _empty_manifest() -> Dict[str, Any]:
    return {'schema_version': MANIFEST_SCHEMA_VERSION, 'hub_namespace': HF_HUB_NAMESPACE, 'weights': {}}


def _validate_entry(name: str, entry: Dict[str, Any], where: Union[str, Path]) -> None:
    for key, typ in MANIFEST_SCHEMA.items():
        if not isinstance(entry.get(key), typ):
            raise WeightsError(f'Manifest {where}: entry {name!r} needs {key!r} of type {typ.__name__}.')
    if entry['model'] != name:
        raise WeightsError(f'Manifest {where}: entry {name!r} has model={entry["model"]!r}.')
    if len(entry['sha256']) != 64:
        raise WeightsError(f'Manifest {where}: entry {name!r} has a malformed sha256.')


def load_manifest(path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Read and validate the manifest; a missing file reads as an empty manifest."""
    path = Path(path) if path else manifest_path()
    if not path.is_file():
        return _empty_manifest()
    with path.open('r', encoding='utf-8') as f:
        manifest = json.load(f)
    if manifest.get('schema_version') != MANIFEST_SCHEMA_VERSION:
        raise WeightsError(
            f'Manifest {path} has schema_version={manifest.get("schema_version")}, this timm-ldn reads '
            f'{MANIFEST_SCHEMA_VERSION}. Upgrade timm-ldn.')
    for name, entry in manifest.get('weights', {}).items():
        _validate_entry(name, entry, path)
    return manifest


def save_manifest(manifest: Dict[str, Any], path: Optional[Union[str, Path]] = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written manifest."""
    path = Path(path) if path else manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest, weights=dict(sorted(manifest.get('weights', {}).items())))
    tmp = path.with_name(path.name + '.tmp')
    with tmp.open('w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write('\n')
    os.replace(tmp, path)
    return path


def add_manifest_entry(entry: Dict[str, Any], path: Optional[Union[str, Path]] = None) -> Path:
    """Insert or replace the entry for ``entry['model']``."""
    _validate_entry(entry.get('model', ''), entry, path or manifest_path())
    manifest = load_manifest(path)
    manifest.setdefault('weights', {})[entry['model']] = entry
    return save_manifest(manifest, path)


def find_entry(
        repo_id: str,
        filename: str = WEIGHTS_FILENAME,
        manifest: Optional[Dict[str, Any]] = None,
) -> Optional[Dict[str, Any]]:
    """Manifest entry of a Hub file (``repo_id`` may carry an ``@revision``), or None."""
    repo_id = repo_id.split('@')[0]
    manifest = manifest if manifest is not None else load_manifest()
    for entry in manifest.get('weights', {}).values():
        if entry['hf_hub_id'] == repo_id and entry['filename'] == filename:
            return entry
    return None


def sha256_file(path: Union[str, Path], chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Union[str, Path], entry: Dict[str, Any]) -> None:
    """Raise ``ChecksumError`` unless the file has the manifest's size and sha256."""
    size = os.path.getsize(path)
    if size != entry['size']:
        what = 'truncated' if size < entry['size'] else 'larger than published'
        raise ChecksumError(
            f'Weight file {path} for {entry["model"]} is {what}: {size} bytes, the manifest records '
            f'{entry["size"]} (sha256 {entry["sha256"]}). Refusing to load it; delete it and download again.')
    digest = sha256_file(path)
    if digest != entry['sha256']:
        raise ChecksumError(
            f'Checksum mismatch for {entry["model"]} ({path}): sha256 {digest}, the manifest records '
            f'{entry["sha256"]}. The file is corrupt or was tampered with; refusing to load it.')


def check_weight_file(path: Union[str, Path]) -> None:
    """Cheap structural check of a local weight file so a truncated file fails with a clear message.

    For safetensors the 8-byte header length, the JSON header and the largest tensor end offset must add up
    to the file size exactly; no tensor data is read.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f'Weight file {path} does not exist.')
    if path.suffix != '.safetensors':
        return  # pickle checkpoints are validated by torch.load(weights_only=True) itself
    size = path.stat().st_size
    problem = ''
    try:
        with path.open('rb') as f:
            (header_len,) = struct.unpack('<Q', f.read(8))
            if header_len > size - 8:
                problem = f'its header claims {header_len} bytes but the file has {size}'
            else:
                header = json.loads(f.read(header_len))
                end = max([v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'] or [0])
                if 8 + header_len + end != size:
                    problem = f'its tensors need {8 + header_len + end} bytes but the file has {size}'
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        problem = f'its header cannot be parsed ({e})'
    if problem:
        raise WeightsError(f'Weight file {path} is truncated or not a safetensors file: {problem}.')


def tags_with_weights(pattern: str = 'ldn_*') -> List[str]:
    """Registered ``architecture.tag`` names matching ``pattern`` whose pretrained cfg points at weights."""
    import timm
    return timm.list_pretrained(pattern)


def probe_input(input_size: Tuple[int, int, int], batch_size: int = 1) -> torch.Tensor:
    """Deterministic, RNG-free input used to fingerprint a weight's logits in the manifest."""
    numel = batch_size * input_size[0] * input_size[1] * input_size[2]
    return torch.arange(numel, dtype=torch.float32).mul(0.618034).sin().mul(2.).reshape(batch_size, *input_size)


def _remove_cached(path: Path) -> None:
    """Drop a bad file from the HF cache (snapshot link and the blob it points to) so a retry re-downloads."""
    try:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path:
            blob.unlink(missing_ok=True)
    except OSError as e:
        _logger.warning(f'Could not remove bad cached weight file {path}: {e}')


@functools.lru_cache(maxsize=None)
def hub_reachable(endpoint: str, timeout: float = 3.) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within ``timeout`` s (once per process and endpoint).

    huggingface_hub retries a failed request five times with back-off (~23 s and six warnings) before it gives up;
    offline, one quick probe lets every loader go straight to the verified cached or shipped copy instead.
    """
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == 'https' else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(repo_id: str, filename: str, cache_dir: Optional[Union[str, Path]]) -> Path:
    """One Hub file through huggingface_hub's cache (atomic temp-file-then-rename); when the Hub cannot be reached
    (``HF_HUB_OFFLINE``, or the endpoint does not answer) only the cache is read, without retries."""
    from huggingface_hub import constants, hf_hub_download
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=offline))
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, consistency OSError)
        where = f'the Hub ({constants.ENDPOINT}) is unreachable and the cache has no copy' if offline else str(e)
        raise WeightsError(
            f'Could not get {filename} of {repo_id} from the Hugging Face Hub ({type(e).__name__}: {where}). '
            f'Nothing was added to the cache; check the network / HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a '
            f'previously cached copy.') from e


def _no_weights_message(name: str) -> str:
    tags = tags_with_weights()
    have = ', '.join(tags) if tags else 'none yet (see weights/manifest.json)'
    return (f'No pretrained weights are published for {name}. LDN tags with weights: {have}. '
            f'Use pretrained=False for a randomly initialised model.')


def resolve_pretrained_overlay(
        variant: str,
        pretrained_cfg: Optional[Any] = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Dict[str, Any]:
    """Make ``pretrained=True`` safe before timm loads; returns the overlay to pass to ``build_model_with_cfg``.

    * no weight source in the resolved cfg → ``NoPretrainedWeightsError`` naming the tags that have weights;
    * a Hub file in our namespace → timm downloads it, its sha256 is checked against the manifest and timm
      is handed the verified cached path (``file``); a Hub file of ours missing from the manifest is refused;
      when the Hub cannot be reached, a copy shipped in ``weights/`` (manifest ``local_file``, same sha256)
      is used instead, so a clone or a wheel install works offline;
    * a file / state dict the caller passed explicitly is the caller's choice: only checked for truncation;
    * a Hub repo outside our namespace (someone's fine-tune via ``hf-hub:``) is left to timm unchanged.
    """
    from timm.models import resolve_pretrained_cfg

    overlay = dict(pretrained_cfg_overlay or {})
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    except RuntimeError as e:  # unknown tag
        tag = pretrained_cfg if isinstance(pretrained_cfg, str) else ''
        raise NoPretrainedWeightsError(_no_weights_message(f'{variant}.{tag}' if tag else variant)) from e
    cfg = cfg.to_dict()
    name = f'{variant}.{cfg["tag"]}' if cfg.get('tag') else variant

    if cfg.get('state_dict') is not None:
        return overlay
    if cfg.get('file'):
        if cfg.get('source') != 'local-dir':  # timm resolves a local-dir itself
            check_weight_file(cfg['file'])
        return overlay
    repo = cfg.get('hf_hub_id')
    if not repo:
        if cfg.get('url'):
            return overlay  # not used by this project; timm's url loader (weights_only=True) handles it
        raise NoPretrainedWeightsError(_no_weights_message(name))

    filename = cfg.get('hf_hub_filename') or WEIGHTS_FILENAME
    entry = find_entry(repo, filename)
    if entry is None:
        if not repo.startswith(HF_HUB_NAMESPACE + '/'):
            _logger.info(f'{repo} is not a {HF_HUB_NAMESPACE} repo: loading it unverified (not in the manifest).')
            return overlay
        raise WeightsError(
            f'{name} points at {repo}/{filename}, which has no entry in the weights manifest '
            f'({manifest_path()}), so its sha256 cannot be verified. Refusing to load unverified weights; '
            f'publish with `ldn export`, or set {MANIFEST_ENV} to the manifest that lists it.')
    try:
        path = _download(repo, filename, cache_dir)
    except WeightsError:
        # no network / Hub: the copy shipped in weights/ is the same file (same sha256), so use it
        local = local_weight_file(name)
        if local is None:
            raise
        _logger.info(f'{repo} unreachable: loading the verified copy shipped with timm-ldn, {local}')
        overlay.update(file=str(local), source=None)
        return overlay
    _verify_cached(path, entry)
    # load exactly the verified bytes through timm's file loader; source='hf-hub' would make timm re-resolve
    overlay.update(file=str(path), source=None)
    return overlay


def _verify_cached(path: Path, entry: Dict[str, Any]) -> None:
    """Check a downloaded file against the manifest; a bad file is evicted from the cache, then refused."""
    try:
        verify_file(path, entry)
    except ChecksumError:
        _remove_cached(path)
        raise


def verified_snapshot(model_name: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Download a published ``<architecture>.<tag>`` (weights + ``config.json``), verify the weights' sha256 and
    return the local snapshot folder.

    For loaders that fetch Hub files themselves and so skip the manifest check, e.g. transformers:
    ``AutoModelForImageClassification.from_pretrained(verified_snapshot('ldn_nano_patch4_28.fmnist_v2'))`` loads
    exactly the verified bytes, from disk.
    """
    entry = load_manifest().get('weights', {}).get(model_name)
    if entry is None:
        raise NoPretrainedWeightsError(_no_weights_message(model_name))
    weights = _download(entry['hf_hub_id'], entry['filename'], cache_dir)
    _verify_cached(weights, entry)
    config = _download(entry['hf_hub_id'], 'config.json', cache_dir)
    if config.parent != weights.parent:  # a new commit landed between the two downloads
        raise WeightsError(f'{entry["hf_hub_id"]} changed while downloading; try again.')
    return weights.parent


def local_weight_file(model_name: str, manifest: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """Verified copy of a published weight shipped in ``weights/`` (manifest ``local_file``), or None.

    Lets ``ldn predict`` / ``ldn info`` run offline; the copy must match the manifest's sha256.
    """
    path = manifest_path()
    manifest = manifest if manifest is not None else load_manifest(path)
    entry = manifest.get('weights', {}).get(model_name)
    if not entry or not entry.get('local_file'):
        return None
    local = (path.parent / entry['local_file']).resolve()
    if not local.is_file():
        return None
    verify_file(local, entry)
    return local
