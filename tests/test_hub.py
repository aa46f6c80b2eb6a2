""" Pretrained weights end to end: ``ldn export`` → a loopback Hub → huggingface_hub's real client → timm.

The client side runs in subprocesses (tests/hub_client.py) because huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE at import. Everything uses the test-only ``ldn_hubtest`` tags (tests/hub_helpers.py).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm

sys.path.insert(0, str(Path(__file__).parent))
import hub_helpers as H  # noqa: E402  registers ldn_hubtest

from timm_ldn import hub  # noqa: E402
from timm_ldn import _checkpoint, ldn  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope='module')
def repos(tmp_path_factory):
    return H.write_fixture_repos(tmp_path_factory.mktemp('hub'))


def _client(phase: str, repos, endpoint) -> dict:
    env = H.client_env(os.environ, endpoint, repos['manifest'].parent.parent / 'hf_home', repos['manifest'])
    r = subprocess.run(
        [sys.executable, str(TESTS / 'hub_client.py'), phase, str(repos['checkpoint']), str(repos['export'])],
        env=env, cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return H.load_json_lines(r.stdout)


@pytest.fixture(scope='module')
def online(repos):
    """Client run against the loopback Hub; also returns the requests the Hub saw."""
    with H.LoopbackHub(H.hub_files(repos), cutoff_repos=(hub.hub_id(f'{H.ARCH}.{H.CUTOFF}'),)) as server:
        results = _client('online', repos, server.endpoint)
        results['_requests'] = list(server.requests)
    return results


@pytest.fixture(scope='module')
def offline(repos, online):
    """Same cache, server stopped, HF_HUB_OFFLINE=1."""
    return _client('offline', repos, None)


def _failed(result: dict, error: str) -> str:
    assert not result['ok'], result
    assert result['error'] == error, result
    return result['message']


# --- download, verification, caching ---

def test_pretrained_tag_downloads_verifies_and_reproduces_exporter_logits(online, repos):
    r = online['pretrained']
    assert r['ok'], r.get('trace')
    assert r['equal'], 'logits differ from the exported checkpoint'
    assert r['probe_sha_match'], 'logits differ from the fingerprint the exporter wrote to the manifest'
    assert '/hub/models--timm-ldn--ldn_hubtest.loopback/snapshots/' in r['file']
    assert r['labels'] == ['class_0', 'class_1']


def test_hf_hub_prefix_uses_exported_config_and_weights(online):
    r = online['hf_hub']
    assert r['ok'], r.get('trace')
    assert r['equal'] and r['num_classes'] == H.NUM_CLASSES
    assert 'models--timm-ldn--ldn_hubtest.loopback' in r['file']  # verified cached copy, not a re-download


def test_files_come_through_the_hub_resolve_endpoint(online):
    base = '/timm-ldn/ldn_hubtest.loopback/resolve/main/'
    reqs = online['_requests']
    for method, name in (('HEAD', 'model.safetensors'), ('GET', 'model.safetensors'), ('GET', 'config.json')):
        assert (method, base + name) in reqs
    # the weights are downloaded once, later loads are HEAD-validated cache hits
    assert reqs.count(('GET', base + 'model.safetensors')) == 1


def test_offline_loads_cached_copy(offline):
    for check in ('pretrained', 'hf_hub'):
        assert offline[check]['ok'], offline[check].get('trace')
        assert offline[check]['equal']
    msg = _failed(offline['not_cached'], 'WeightsError')
    assert 'timm-ldn/ldn_hubtest.corrupt' in msg and 'HF_HUB_OFFLINE' in msg


# --- the user paths ---

def test_pretrained_cfg_overlay_file(online):
    assert online['overlay_file']['ok'] and online['overlay_file']['equal']


def test_features_only_pretrained(online):
    r = online['features_only']
    assert r['ok'], r.get('trace')
    assert r['n'] == 2 and r['equal'] and r['shapes'] == [[1, 32, 4, 4]] * 2


def test_in_chans_1_adapts_stem(online):
    r = online['in_chans_1']
    assert r['ok'], r.get('trace')
    assert r['shape'] == [32, 1, 8, 8] and r['summed'] and r['runs'] == [1, H.NUM_CLASSES]


def test_num_classes_5_resets_head_keeps_backbone(online):
    r = online['num_classes_5']
    assert r['ok'], r.get('trace')
    assert r['out'] == [1, 5] and r['backbone_equal']


# --- failures are loud, the cache stays clean ---

def test_corrupted_file_is_refused_and_evicted(online):
    msg = _failed(online['corrupt'], 'ChecksumError')
    assert 'Checksum mismatch' in msg and 'ldn_hubtest.corrupt' in msg
    assert not any('ldn_hubtest.corrupt' in w for w in online['cache']['weights'])


def test_truncated_file_gives_clear_error(online):
    msg = _failed(online['truncated'], 'ChecksumError')
    assert 'is truncated' in msg
    msg = _failed(online['overlay_truncated'], 'WeightsError')
    assert 'truncated' in msg and 'truncated.safetensors' in msg


def test_dropped_transfer_gives_clear_error(online):
    msg = _failed(online['cutoff'], 'WeightsError')
    assert 'Could not get model.safetensors of timm-ldn/ldn_hubtest.cutoff' in msg


def test_cache_never_half_written(online, offline):
    for cache in (online['cache'], offline['cache']):
        assert cache['incomplete'] == [] and cache['bad_blobs'] == [] and cache['dangling'] == []
        assert sorted(w.split('/')[0] for w in cache['weights']) == [
            'models--timm-ldn--ldn_hubtest.loopback', 'models--timm-ldn--ldn_hubtest.otherarch']


@pytest.mark.parametrize('check', ['otherarch', 'otherarch_new_head'])
def test_other_architecture_names_keys(online, check):
    # refused even when timm loads non-strictly for a new head: not one tensor of it would be copied
    msg = _failed(online[check], 'CheckpointArchitectureError')
    assert 'Not an LDN checkpoint' in msg and 'conv1.weight' in msg and 'blocks.<i>.diffusion.a_raw' in msg


def test_hub_file_missing_from_manifest_is_refused(online):
    msg = _failed(online['unlisted'], 'WeightsError')
    assert 'no entry in the weights manifest' in msg


def test_tag_without_weights_names_tags_with_weights(online):
    msg = _failed(online['noweights'], 'NoPretrainedWeightsError')
    assert 'ldn_hubtest.noweights' in msg and 'ldn_hubtest.loopback' in msg


# --- in-process: registry, filter, manifest, export ---

def test_variants_without_weights_raise_instead_of_random_init():
    # every registered LDN name whose default cfg has no weights (stays meaningful once some get published)
    names = [m for m in timm.list_models('ldn_*') if not timm.models.is_model_pretrained(m)]
    names += ['ldn_tiny.nosuchtag', f'{H.ARCH}.{H.NO_WEIGHTS}']
    assert 'ldn_base' in names or timm.models.is_model_pretrained('ldn_base')
    for name in names:
        with pytest.raises(hub.NoPretrainedWeightsError, match='LDN tags with weights: .*ldn_hubtest.loopback'):
            timm.create_model(name, pretrained=True)
        with pytest.raises(hub.NoPretrainedWeightsError):
            timm.create_model(name, pretrained=True, features_only=True)


def _tiny():
    return timm.create_model(H.ARCH).eval()


def test_checkpoint_filter_fn_reads_train_py_layouts():
    model = _tiny()
    sd = model.state_dict()
    shifted = {k: v + 1 for k, v in sd.items()}
    cases = {
        'bare': sd,
        'ddp_state_dict': {'state_dict': {'module.' + k: v for k, v in sd.items()}, 'epoch': 3},
        'compiled': {'state_dict': {'_orig_mod.' + k: v for k, v in sd.items()}},
        'ema_preferred': {'state_dict': shifted, 'state_dict_ema': sd},
    }
    for case, ckpt in cases.items():
        out = _checkpoint.checkpoint_filter_fn(ckpt, model)
        assert out.keys() == sd.keys(), case
        assert all(torch.equal(out[k], sd[k]) for k in sd), case


def test_newer_layout_is_refused_with_the_fix():
    model = _tiny()
    sd = model.state_dict()
    current = _checkpoint.LDN_LAYOUT_VERSION
    out = _checkpoint.checkpoint_filter_fn(dict(sd, **{_checkpoint.LAYOUT_VERSION_KEY: torch.tensor(current)}), model)
    assert out.keys() == sd.keys()  # the version key is read, not loaded
    with pytest.raises(RuntimeError, match=f'layout v{current + 1}, this timm-ldn reads up to v{current}.*Upgrade'):
        _checkpoint.checkpoint_filter_fn(dict(sd, **{_checkpoint.LAYOUT_VERSION_KEY: current + 1}), model)


def test_plain_mlp_checkpoints_name_the_fix():
    """A checkpoint without the depthwise conv in F (layout v1, timm-ldn < 0.2) gets one message with the fix, and
    loads into the block it names."""
    from timm.layers import Mlp
    v1 = timm.create_model('ldn_tiny', depth=2, mlp_layer=Mlp, mlp_ratio=4.)
    v2 = timm.create_model('ldn_tiny', depth=2)
    assert hasattr(v2.blocks[0].mlp, 'dwconv') and not hasattr(v1.blocks[0].mlp, 'dwconv')
    with pytest.raises(RuntimeError, match=r'layout v1 .*mlp_layer=timm\.layers\.Mlp, mlp_ratio=4\.0'):
        v2.load_state_dict(v1.state_dict())  # the load_state_dict pre-hook: train.py --resume / checkpoint_path=
    with pytest.raises(RuntimeError, match='depthwise conv in F'):
        v1.load_state_dict(v2.state_dict())
    fixed = timm.create_model('ldn_tiny', depth=2, mlp_layer=Mlp, mlp_ratio=4.)
    fixed.load_state_dict(_checkpoint.checkpoint_filter_fn(v1.state_dict(), fixed))


def test_pretrained_strict_false_loads_a_partial_checkpoint(tmp_path):
    """As in timm: pretrained_strict=False loads what fits (here: 2 of 3 blocks) and leaves the rest initialised."""
    from safetensors.torch import save_file
    src = timm.create_model(H.ARCH, depth=2)
    path = tmp_path / 'partial.safetensors'
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(RuntimeError, match='Missing key'):
        timm.create_model(H.ARCH, depth=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = timm.create_model(H.ARCH, depth=3, pretrained=True, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_retired_v1_tag_is_gone_and_untagged_names_build_the_default():
    with pytest.raises(RuntimeError):
        timm.create_model('ldn_nano_patch4_28.fmnist', pretrained=True)
    fresh = timm.create_model('ldn_nano_patch4_28')  # the default tag's architecture
    assert hasattr(fresh.blocks[0].mlp, 'dwconv') and fresh.blocks[0].mlp.fc1.out_features == 248


def test_manifest_schema_is_enforced(tmp_path):
    path = tmp_path / 'manifest.json'
    hub.save_manifest(dict(schema_version=1, weights={'x.y': {'model': 'x.y'}}), path)
    with pytest.raises(hub.WeightsError, match="needs 'architecture'"):
        hub.load_manifest(path)
    path.write_text(json.dumps(dict(schema_version=99, weights={})))
    with pytest.raises(hub.WeightsError, match='schema_version=99'):
        hub.load_manifest(path)


def test_repo_manifest_matches_registered_tags(monkeypatch):
    """Every published ldn tag has a manifest entry with a shipped or Hub file, and vice versa."""
    monkeypatch.delenv(hub.MANIFEST_ENV, raising=False)
    manifest = hub.load_manifest()
    assert manifest['hub_namespace'] == hub.HF_HUB_NAMESPACE
    real_tags = [t for t in hub.tags_with_weights() if not t.startswith(H.ARCH)]
    for t in real_tags:
        cfg = timm.models.get_pretrained_cfg(t)
        assert hub.find_entry(cfg.hf_hub_id, manifest=manifest), f'{t} has no manifest entry'
    for name, entry in manifest['weights'].items():
        assert entry['hf_hub_id'] == hub.hub_id(name)
        if entry['architecture'] == 'LdnSequenceClassifier':  # not a timm model: load_published, with its config
            assert hub.local_weight_file(name, manifest).with_name('config.json').is_file()
            continue
        assert name in real_tags, f'manifest entry {name} is not a registered tag'
        if entry.get('local_file'):
            assert hub.local_weight_file(name, manifest) is not None


def test_export_writes_ema_weights_timm_config_and_card(repos):
    import safetensors.torch
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(repos['checkpoint'], weights_only=True)
    exported = safetensors.torch.load_file(str(repos['export'] / 'model.safetensors'))
    assert exported.keys() == ckpt['state_dict_ema'].keys()
    assert all(torch.equal(exported[k], v) for k, v in ckpt['state_dict_ema'].items())

    cfg = json.loads((repos['export'] / 'config.json').read_text())
    assert cfg['architecture'] == H.ARCH and cfg['num_classes'] == H.NUM_CLASSES
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32] and cfg['pretrained_cfg']['pool_size'] == [4, 4]
    assert cfg['pretrained_cfg']['label_names'][:2] == ['class_0', 'class_1']

    entry = hub.load_manifest(repos['manifest'])['weights'][f'{H.ARCH}.{H.GOOD}']
    assert entry['sha256'] == hub.sha256_file(repos['export'] / 'model.safetensors')
    assert entry['provenance']['epoch'] == 7 and entry['provenance']['ema'] is True
    assert entry['eval'] == {'top1': 81.5, 'dataset': 'synthetic/val'}
    card = (repos['export'] / 'README.md').read_text()
    for text in (f'{entry["num_params"] / 1e6:.3f} M', 'GMACs', '| top1 | 81.5 |', "hf-hub:timm-ldn/ldn_hubtest",
                 'library_name: timm', entry['sha256']):
        assert text in card


class _RunsCode:
    """Pickles to a call that would create a file, to prove checkpoints are never unpickled unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_export_never_unpickles_code(tmp_path, capsys):
    from timm_ldn.cli import main as ldn_main
    marker, ckpt = tmp_path / 'pwned', tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': _tiny().state_dict(), 'payload': _RunsCode(marker)}, ckpt)
    rc = ldn_main(['export', str(ckpt), '--model', f'{H.ARCH}.{H.GOOD}', '--output', str(tmp_path / 'out'),
                   '--no-manifest', '--eval', 'top1=1', '--recipe', 'r', '--data', 'd', '--reproduce', 'x'])
    assert rc == 2 and not marker.exists()
    assert 'ldn export:' in capsys.readouterr().err


def test_export_refuses_checkpoint_of_other_size(tmp_path, capsys):
    from timm_ldn.cli import main as ldn_main
    ckpt = tmp_path / 'ckpt.pth'
    torch.save(timm.create_model(H.ARCH, embed_dim=48).state_dict(), ckpt)
    rc = ldn_main(['export', str(ckpt), '--model', f'{H.ARCH}.{H.GOOD}', '--output', str(tmp_path / 'out'),
                   '--no-manifest', '--eval', 'top1=1', '--recipe', 'r', '--data', 'd', '--reproduce', 'x'])
    assert rc == 2
    assert 'embed_dim 48 in the checkpoint vs 32 in the model' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_export_from_safetensors_state_dict(repos, tmp_path, capsys):
    from timm_ldn.cli import main as ldn_main
    out = tmp_path / 'out'
    rc = ldn_main(['export', str(repos['export'] / 'model.safetensors'), '--model', f'{H.ARCH}.{H.GOOD}',
                   '--output', str(out), '--no-manifest', '--eval', 'top1=1', '--recipe', 'r', '--data', 'd',
                   '--reproduce', 'x'])
    assert rc == 0, capsys.readouterr().err
    # same tensors in, same bytes out: export is deterministic
    assert hub.sha256_file(out / 'model.safetensors') == hub.sha256_file(repos['export'] / 'model.safetensors')


def test_offline_both_loaders_answer_at_once_from_the_verified_shipped_copy(tmp_path):
    """Network unreachable (HF_ENDPOINT on a closed loopback port, empty HF cache): load_published and
    timm.create_model(pretrained=True) share one resolver, which probes the Hub once and goes straight to the
    verified shipped copy: no retries, no connection warnings, well under 5 s each (huggingface_hub alone retries
    five times, ~23 s)."""
    code = (
        'import json, time, timm, timm_ldn\n'
        'from timm_ldn.sequence import load_published\n'
        't = time.perf_counter(); load_published("ldn_seq_listops_512.lra"); seq = time.perf_counter() - t\n'
        't = time.perf_counter(); timm.create_model("ldn_nano_convtok_28.fmnist", pretrained=True)\n'
        'print(json.dumps(dict(seq=seq, timm=time.perf_counter() - t)))\n')
    env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'))
    env.pop('HF_HUB_OFFLINE', None)
    env.pop(hub.MANIFEST_ENV, None)
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    took = json.loads(proc.stdout.strip().splitlines()[-1])
    assert took['seq'] < 5 and took['timm'] < 5, took
    assert 'Retrying' not in proc.stderr and 'WARNING' not in proc.stderr.upper(), proc.stderr[-2000:]
