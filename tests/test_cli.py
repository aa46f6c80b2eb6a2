""" ``ldn predict`` / ``ldn info`` (in-process, offline: weights come from the manifest's verified local copy)."""
import io
import json
import re
import sys
from pathlib import Path
from typing import List

import pytest
import torch
import timm
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import hub_helpers as H  # noqa: E402  registers ldn_hubtest

from timm_ldn import hub  # noqa: E402
from timm_ldn.cli import main as ldn_main  # noqa: E402

TAG = f'{H.ARCH}.{H.GOOD}'


@pytest.fixture(scope='module')
def repos(tmp_path_factory):
    return H.write_fixture_repos(tmp_path_factory.mktemp('cli'))


@pytest.fixture
def offline_manifest(repos, monkeypatch):
    """Use the test manifest and make any Hub access fail: predict / info must work from the local copy."""
    monkeypatch.setenv(hub.MANIFEST_ENV, str(repos['manifest']))

    def no_network(*args, **kwargs):
        raise AssertionError('tried to download although a verified local copy exists')
    monkeypatch.setattr(hub, '_download', no_network)
    return repos['manifest']


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    g = torch.Generator().manual_seed(0)
    for i in range(11):  # ≥ 10: the progress bar path
        sub = root / ('sub' if i % 2 else '')
        sub.mkdir(exist_ok=True)
        arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f'img{i:02d}.png')
    (root / 'broken.png').write_bytes(b'not an image at all')
    (root / 'notes.txt').write_text('ignored: not an image extension')
    return root


def _predict_json(capsys, *argv):
    rc = ldn_main(['predict', *argv, '--json'])
    out = capsys.readouterr()
    return rc, [json.loads(line) for line in out.out.splitlines()], out.err


def test_predict_folder_topk_with_class_names(offline_manifest, images, capsys):
    rc, rows, err = _predict_json(capsys, str(images), '--model', TAG, '--topk', '3')
    assert rc == 0
    assert len(rows) == 11 and all(len(r['topk']) == 3 for r in rows)
    assert all(p['label'] == f'class_{p["index"]}' for r in rows for p in r['topk'])
    assert 'verified local copy' in err
    assert 'skipped' in err and 'broken.png' in err and 'notes.txt' not in err
    assert '12/12' not in err and 'img/s' not in err  # stdout is not a terminal here: no progress bar


class _Terminal(io.StringIO):
    """Receives what a terminal would; ``isatty()`` is True, so ``ldn predict`` draws its bar."""

    def isatty(self) -> bool:
        return True


def _screen(stream: str) -> List[str]:
    """The lines a terminal shows: ``\r`` returns to column 0 and later characters overwrite earlier ones."""
    lines, line, col = [], [], 0
    for ch in stream:
        if ch == '\n':
            lines.append(''.join(line))
            line, col = [], 0
        elif ch == '\r':
            col = 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + [''.join(line)]


@pytest.mark.parametrize('as_json', [False, True])
def test_predict_results_and_progress_bar_never_share_a_line(offline_manifest, images, monkeypatch, as_json):
    """stdout and stderr on one terminal (the usual shell): every result line reads clean, the bar ran."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    monkeypatch.setattr(sys, 'stderr', terminal)
    rc = ldn_main(['predict', str(images), '--model', TAG, '--batch-size', '2'] + (['--json'] if as_json else []))
    assert rc == 0
    shown = [line.rstrip() for line in _screen(terminal.getvalue())]
    assert any('12/12' in line for line in shown), 'no progress bar although both streams are terminals'
    if as_json:
        results = [line for line in shown if '"image"' in line]
        assert len(results) == 11 and all(json.loads(line)['topk'] for line in results), results
    else:
        results = [line for line in shown if '.png: class_' in line]
        assert len(results) == 11
        for line in results:
            assert re.fullmatch(r'\S+img\d\d\.png: (class_\d \(\d+\.\d%\)(, )?)+', line), line


def test_predict_json_into_a_pipe_is_pure_json(offline_manifest, images, monkeypatch, capsys):
    """stdout redirected (``ldn predict --json ... > out.jsonl``) while stderr is a terminal: no bar at all."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    assert ldn_main(['predict', str(images), '--model', TAG, '--json']) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)['image'] for line in out.splitlines()] == [
        str(p) for p in sorted(images.rglob('img*.png'))]
    assert 'img/s' not in terminal.getvalue() and '12/12' not in terminal.getvalue()


def test_predict_bundled_samples(monkeypatch, capsys):
    """``ldn predict --samples``: the shipped Fashion-MNIST images with the shipped weights, no Hub."""
    monkeypatch.delenv(hub.MANIFEST_ENV, raising=False)
    monkeypatch.setattr(hub, '_download', lambda *a, **k: (_ for _ in ()).throw(AssertionError('no Hub needed')))
    meta = json.loads((hub.samples_dir() / 'samples.json').read_text())
    rows = _predict_json(capsys, '--samples', '--model', meta['model'], '--topk', '1')[1]
    truth = meta['images']
    assert len(rows) == len(truth) == 10
    for row in rows:
        assert row['topk'][0]['index'] == truth[Path(row['image']).name]['predicted'], row


def test_predict_matches_model_with_timm_preprocessing(offline_manifest, images, capsys):
    path = images / 'img00.png'
    rc, rows, _ = _predict_json(capsys, str(path), '--model', TAG, '--topk', '1')
    assert rc == 0
    local = hub.local_weight_file(TAG)
    model = timm.create_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(file=str(local))).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg['input_size'] == (3, 32, 32) and cfg['mean'] == (0.5, 0.5, 0.5)
    x = timm.data.create_transform(**cfg)(Image.open(path).convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        prob, idx = model(x).softmax(-1).topk(1)
    assert rows[0]['topk'][0]['index'] == idx.item()
    assert rows[0]['topk'][0]['prob'] == pytest.approx(prob.item(), abs=1e-6)


def test_predict_text_output_and_nothing_readable(offline_manifest, images, tmp_path, capsys):
    assert ldn_main(['predict', str(images / 'img00.png'), '--model', TAG]) == 0
    assert capsys.readouterr().out.startswith(f'{images / "img00.png"}: class_')
    rc = ldn_main(['predict', str(images / 'broken.png'), str(tmp_path / 'missing.jpg'), '--model', TAG])
    err = capsys.readouterr().err
    assert rc == 1
    assert 'skipped' in err and 'missing.jpg' in err and 'no readable image' in err


def test_predict_refuses_tampered_local_copy(offline_manifest, images, tmp_path, monkeypatch, capsys):
    manifest = hub.load_manifest()
    entry = manifest['weights'][TAG]
    bad = tmp_path / 'weights' / entry['local_file']
    bad.parent.mkdir(parents=True)
    data = bytearray((offline_manifest.parent / entry['local_file']).read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    hub.save_manifest(manifest, tmp_path / 'weights' / 'manifest.json')
    monkeypatch.setenv(hub.MANIFEST_ENV, str(tmp_path / 'weights' / 'manifest.json'))
    rc = ldn_main(['predict', str(images / 'img00.png'), '--model', TAG])
    assert rc == 2 and 'Checksum mismatch' in capsys.readouterr().err


def test_predict_without_weights_is_an_error(images, capsys):
    rc = ldn_main(['predict', str(images / 'img00.png'), '--model', f'{H.ARCH}.{H.NO_WEIGHTS}'])
    assert rc == 2 and f'No pretrained weights are published for {H.ARCH}.{H.NO_WEIGHTS}' in capsys.readouterr().err


def test_info_reports_size_gmacs_cfg_and_weights(offline_manifest, capsys):
    assert ldn_main(['info', TAG, '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    model = timm.create_model(TAG)
    assert info['params'] == sum(p.numel() for p in model.parameters())
    assert info['pretrained_cfg']['input_size'] == [3, 32, 32] and info['num_labels'] == H.NUM_CLASSES
    w = info['weights'][TAG]
    assert w['hf_hub_id'] == hub.hub_id(TAG) and w['local_file'].endswith('model.safetensors')
    assert info['weights'][f'{H.ARCH}.{H.UNLISTED}'] == {}  # registered but unverifiable
    # linear cost: 4x the tokens is ~4x the MACs
    assert ldn_main(['info', TAG, '--json', '--input-size', '3', '64', '64']) == 0
    ratio = json.loads(capsys.readouterr().out)['gmacs'] / info['gmacs']
    assert 3.5 < ratio < 4.5, ratio


def test_info_text_for_model_without_weights(capsys):
    assert ldn_main(['info', 'ldn_tiny', '--input-size', '3', '32', '32']) == 0
    out = capsys.readouterr().out
    assert out.startswith('ldn_tiny: ') and 'GMACs' in out and 'none published for ldn_tiny' in out
    assert ldn_main(['info', 'no_such_model']) == 2


@pytest.mark.parametrize('model,size', [('deit_tiny_patch16_224', 32), ('convnext_atto', 64)])
def test_benchmark_times_any_timm_model_at_any_size(model, size, capsys):
    """``ldn benchmark MODEL --json``: one JSON object on stdout; a ViT is re-created for the size (its
    position embedding is fixed), a model without ``img_size`` runs the size as is; threads are restored."""
    threads = torch.get_num_threads()
    argv = ['benchmark', model, '--img-size', str(size), '-b', '2', '--iters', '3', '--warmup', '1',
            '--threads', '1', '--json']
    assert ldn_main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r['model'] == model and r['mode'] == 'inference' and r['img_size'] == [size, size]
    assert r['batch_size'] == 2 and r['iters'] == 3 and r['threads'] == 1
    assert 0 < r['ms_min'] <= r['ms_per_iter'] <= r['ms_max']
    assert r['img_s'] == pytest.approx(2 / (r['ms_per_iter'] / 1e3))
    assert torch.get_num_threads() == threads


def test_benchmark_train_step_with_model_kwargs_writes_only_the_json(tmp_path, monkeypatch, capsys):
    """Default input from the pretrained cfg (1×28×28 for the Fashion-MNIST model), ``--model-kwargs`` the
    timm way, ``--train``; the only file written is the one named by ``--json PATH``."""
    monkeypatch.chdir(tmp_path)
    argv = ['benchmark', 'ldn_nano_patch4_28', '--train', '--iters', '2', '--warmup', '1', '-b', '2',
            '--model-kwargs', 'depth=1', 'mlp_ratio=2.0', '--json', 'r.json']
    assert ldn_main(argv) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(r'ldn_nano_patch4_28 train 28x28 batch 2 \(cpu, \d+ threads?\): [\d.]+ ms/iter '
                        r'\(min [\d.]+, max [\d.]+\), [\d.]+ img/s', line), line
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']
    r = json.loads((tmp_path / 'r.json').read_text())
    assert r['mode'] == 'train' and r['in_chans'] == 1 and r['img_size'] == [28, 28]
    assert r['model_kwargs'] == {'depth': 1, 'mlp_ratio': 2.0}
    assert ldn_main(['benchmark', 'ldn_nano_patch4_28', '--iters', '1', '--warmup', '0']) == 0
    assert [p.name for p in tmp_path.iterdir()] == ['r.json']  # without --json nothing is written


def test_benchmark_unknown_model_is_an_error(capsys):
    assert ldn_main(['benchmark', 'no_such_model']) == 2
    assert 'no_such_model' in capsys.readouterr().err
