"""Fashion-MNIST pieces: IDX parsing (synthetic files), the 28 px variant's cfg/forward, and the shipped weights.

The weight checks skip when ``weights/`` has no ``ldn_nano_patch4_28.fmnist`` copy; the test-subset check also
skips when the Fashion-MNIST IDX files are not installed (``apt-get install -y dataset-fashion-mnist``).
"""
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import timm
from timm.data import create_transform, resolve_data_config

import timm_ldn  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / 'eval' / d) for d in ('fmnist', 'speed')] + [str(ROOT / 'eval')]
import fmnist_data  # noqa: E402

MODEL = 'ldn_nano_patch4_28'
# every shipped Fashion-MNIST tag; the first is the README main job's model, whose predictions weights/samples record
SHIPPED = ('ldn_nano_convtok_28.fmnist', 'ldn_nano_patch4_28.fmnist_v2')
DEFAULT = SHIPPED[0]
SAMPLES = ROOT / 'weights' / 'samples'


def _idx_bytes(arr: np.ndarray, magic_dtype: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_dtype, arr.ndim]) + struct.pack('>' + 'I' * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.mark.parametrize('compress', [False, True])
def test_read_idx_roundtrip(tmp_path, rng, compress):
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    for name, arr in (('img', images), ('lbl', labels)):
        raw = _idx_bytes(arr)
        (tmp_path / name).write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(fmnist_data.read_idx(tmp_path / 'img', 3, 3), images)
    np.testing.assert_array_equal(fmnist_data.read_idx(tmp_path / 'lbl', 1, 3), labels)


@pytest.mark.parametrize('corrupt, match', [
    (lambda raw: b'\x01' + raw[1:], 'magic'),                  # first magic byte must be 0
    (lambda raw: raw[:2] + b'\x0d' + raw[3:], 'dtype'),        # float IDX, not unsigned byte
    (lambda raw: raw[:3] + b'\x01' + raw[4:], 'dims'),         # images declared 1-D
    (lambda raw: raw[:-5], 'payload'),                         # truncated pixels
    (lambda raw: raw + b'\x00', 'payload'),                    # trailing garbage
    (lambda raw: raw[:3], 'too short'),
])
def test_read_idx_rejects_bad_files(tmp_path, rng, corrupt, match):
    raw = _idx_bytes(rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8))
    path = tmp_path / 'bad-idx3-ubyte'
    path.write_bytes(corrupt(raw))
    with pytest.raises(fmnist_data.IdxFormatError, match=match) as e:
        fmnist_data.read_idx(path, 3, 2)
    assert str(path) in str(e.value)  # the message names the file


def test_read_idx_wrong_count(tmp_path, rng):
    path = tmp_path / 'lbl'
    path.write_bytes(_idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(fmnist_data.IdxFormatError, match='declares 5 items, expected 60000'):
        fmnist_data.read_idx(path, 1, 60000)


def test_missing_data_names_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
        fmnist_data.prepare(src=tmp_path / 'nope', out=tmp_path / 'out')
    assert fmnist_data.main(['--src', str(tmp_path / 'nope'), '--out', str(tmp_path / 'out')]) == 1


def test_holdout_is_stratified_and_fixed():
    labels = np.repeat(np.arange(10), 20)
    a = fmnist_data.stratified_holdout(labels, 3, seed=0)
    assert a.sum() == 30 and all(a[labels == c].sum() == 3 for c in range(10))
    np.testing.assert_array_equal(a, fmnist_data.stratified_holdout(labels, 3, seed=0))
    # folder names sort in label order, so timm's ImageFolder class index == Fashion-MNIST label
    assert sorted(fmnist_data.CLASS_DIRS) == list(fmnist_data.CLASS_DIRS)


def test_variant_cfg_and_forward():
    model = timm.create_model(MODEL).eval()
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (1, 28, 28) and cfg['num_classes'] == 10 and cfg['crop_pct'] == 1.0
    assert cfg['pool_size'] == (7, 7) and len(cfg['mean']) == len(cfg['std']) == 1
    assert model.patch_size == (4, 4) and model.in_chans == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert model.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 64, 7, 7)
    # timm's eval transform from the cfg leaves a 28x28 grayscale image's pixels alone (only normalizes)
    from PIL import Image
    img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x = create_transform(**resolve_data_config({}, model=model))(Image.fromarray(img, mode='L'))
    expected = (torch.from_numpy(img).float() / 255. - cfg['mean'][0]) / cfg['std'][0]
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=0)


def _shipped_model(tag: str = DEFAULT) -> torch.nn.Module:
    from timm_ldn.hub import local_weight_file
    try:
        local = local_weight_file(tag)
    except Exception as e:  # noqa: BLE001  a tampered copy must fail loudly, not skip
        raise AssertionError(f'shipped {tag} copy fails verification: {e}') from e
    if local is None:
        pytest.skip(f'no shipped {tag} weights in weights/')
    return timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(local))).eval()


def _predict(model: torch.nn.Module, images) -> torch.Tensor:
    tf = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        return model(torch.stack([tf(im) for im in images])).argmax(-1)


def test_shipped_weights_on_bundled_samples():
    model = _shipped_model()
    from PIL import Image
    meta = json.loads((SAMPLES / 'samples.json').read_text())
    assert meta['model'] == DEFAULT  # the samples record the main job's model
    files = sorted(meta['images'])
    images = [Image.open(SAMPLES / f).convert('L') for f in files]
    pred = _predict(model, images).tolist()
    assert pred == [meta['images'][f]['predicted'] for f in files]  # exactly what the exporter recorded
    labels = [meta['images'][f]['label'] for f in files]
    assert sum(p == y for p, y in zip(pred, labels)) / len(files) >= 0.75


def _official_test_split():
    """The official 10k test images and labels from the IDX files (skips where they are not installed)."""
    try:
        return fmnist_data.load_split(fmnist_data.DEFAULT_SRC, 'test')
    except FileNotFoundError:
        pytest.skip('Fashion-MNIST IDX files not installed')


def test_shipped_weights_test_subset_accuracy():
    """First 2000 official test images, read from the IDX file: top-1 as recorded at export (±0.1%)."""
    model = _shipped_model()
    images, labels = _official_test_split()
    from PIL import Image
    meta = json.loads((SAMPLES / 'samples.json').read_text())
    n = meta['test_subset']['images']
    pred = _predict(model, [Image.fromarray(im, mode='L') for im in images[:n]])
    top1 = 100. * (pred == torch.from_numpy(labels[:n].astype(np.int64))).float().mean().item()
    assert abs(top1 - meta['test_subset']['top1']) <= 0.1


@pytest.mark.parametrize('tag', SHIPPED)
def test_int8_dynamic_quantization_keeps_the_shipped_accuracy(tag):
    """quantize_dynamic on every Linear of a shipped tag: test top-1 within 0.5 points of fp32 (official 10k)."""
    from timm_ldn import hub
    model = _shipped_model(tag)
    images, labels = _official_test_split()
    import copy
    cfg = model.pretrained_cfg
    x = (torch.from_numpy(np.array(images)).float().unsqueeze(1) / 255. - cfg['mean'][0]) / cfg['std'][0]
    y = torch.from_numpy(labels.astype(np.int64))
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

    def top1(m):
        with torch.no_grad():
            pred = torch.cat([m(x[i:i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])
        return 100. * (pred == y).float().mean().item()
    fp32, int8 = top1(model), top1(quantized)
    assert abs(fp32 - hub.load_manifest()['weights'][tag]['eval']['top1']) <= 0.01  # published, via plain tensors
    assert abs(int8 - fp32) <= 0.5, (fp32, int8)


@pytest.mark.parametrize('tag', SHIPPED)
def test_pretrained_true_works_offline_from_the_shipped_copy(tmp_path, tag):
    """timm.create_model('<tag>', pretrained=True) in a clone without network: the verified shipped copy loads."""
    import subprocess
    from safetensors.torch import load_file
    code = (
        "import timm, timm_ldn, torch\n"
        "m = timm.create_model('%s', pretrained=True)\n"
        "torch.save(m.state_dict(), r'%s')\n" % (tag, tmp_path / 'sd.pt'))
    env = dict(__import__('os').environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = torch.load(tmp_path / 'sd.pt', weights_only=True)
    shipped = load_file(str(Path(timm_ldn.__file__).parents[1] / 'weights' / tag / 'model.safetensors'))
    for k, v in shipped.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


# --- the in-memory training input path (eval/fmnist/fmnist_tensors.py) ------------------------------------------------

import fmnist_tensors  # noqa: E402

RECIPE_AUG = dict(mean=(0.2859,), std=(0.3529,), scale=(0.75, 1.0), ratio=(0.8, 1.25), hflip=0.5, reprob=0.1,
                  remode='pixel', vflip=0.0, color_jitter=0.0)


def test_crop_flip_is_exact_at_full_scale():
    x = torch.rand(4, 1, 28, 28) * 255
    same = fmnist_tensors.random_resized_crop_flip(x, (1., 1.), (1., 1.), hflip=0.)
    flipped = fmnist_tensors.random_resized_crop_flip(x, (1., 1.), (1., 1.), hflip=1.)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-3)
    torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-3)


def test_random_crop_zooms_in():
    """A crop of a quarter of the area magnifies: a centred dot grows, and nothing comes from outside the image."""
    x = torch.zeros(64, 1, 28, 28)
    x[..., 13:15, 13:15] = 255.
    out = fmnist_tensors.random_resized_crop_flip(x, (0.25, 0.25), (1., 1.), hflip=0.)
    assert (out.sum((1, 2, 3)) > x.sum((1, 2, 3)) * 2).float().mean() > 0.5
    assert out.min() >= 0 and out.max() <= 255 + 1e-3


def test_random_erasing_rate_and_area():
    g = torch.Generator().manual_seed(0)
    out = fmnist_tensors.random_erase_pixels(torch.zeros(2000, 1, 28, 28), 0.25, generator=g)
    erased = (out != 0).flatten(1).float().mean(1)
    assert abs((erased > 0).float().mean().item() - 0.25) < 0.04
    assert 0.02 * 0.5 < erased[erased > 0].min() and erased.max() <= 1 / 3 + 0.05


def test_tensor_batches_epochs_are_reproducible_and_cover_the_split():
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(300) % 10
    batches = fmnist_tensors.TensorBatches(images, labels, 64, RECIPE_AUG, training=True, seed=3)
    assert len(batches) == 4  # the partial batch is dropped when training
    batches.set_epoch(2)
    first = [y for _, y in batches]
    batches.set_epoch(0)
    list(batches)
    batches.set_epoch(2)  # same epoch -> same shuffle and augmentation, whatever ran before (resume)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in batches]))
    ordered = fmnist_tensors.TensorBatches(images, labels, 64, RECIPE_AUG, training=False)
    xs, ys = zip(*ordered)
    assert len(ordered) == 5 and torch.equal(torch.cat(ys), labels)
    # eval path = normalisation only
    torch.testing.assert_close(torch.cat(xs), (images.float() / 255 - 0.2859) / 0.3529)


def test_tensor_batches_refuse_augmentations_they_do_not_implement():
    with pytest.raises(ValueError, match='--pipeline timm'):
        fmnist_tensors.TensorBatches(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4), 2,
                                     dict(RECIPE_AUG, vflip=0.5), training=True)


@pytest.mark.skipif(not fmnist_data.DEFAULT_SRC.is_dir(), reason='dataset-fashion-mnist not installed')
def test_in_memory_splits_match_the_imagefolder_splits():
    sizes = {s: len(fmnist_tensors.load_split_tensors(s)[1]) for s in fmnist_tensors.SPLITS}
    assert sizes == {'train': 55000, 'validation': 5000, 'test': 10000}
    _, val_labels = fmnist_tensors.load_split_tensors('validation')
    assert torch.bincount(val_labels).tolist() == [500] * 10  # the stratified hold-out of fmnist_data.py


# --- the block study's rows (eval/fmnist/block_study.py) ------------------------------------------------------------

import block_study  # noqa: E402
import train_fmnist  # noqa: E402


def test_study_commands_resume_and_run_one_thread_each():
    cmd = block_study._command('final', 'ldn_v2', 2, 40)
    assert cmd[cmd.index('--experiment') + 1] == 'final_ldn_v2_s2' and '--resume' in cmd
    assert cmd[cmd.index('--threads') + 1] == '1' and cmd[cmd.index('--epochs') + 1] == '40'
    assert cmd[cmd.index('--model') + 1] == 'ldn_v2'  # the row itself: train_fmnist builds it from study_models
    assert '--fp32' not in cmd  # the recipe's precision


def test_fp32_screen_turns_the_recipes_autocast_off_and_only_that():
    """``--stage screen_fp32`` (CPUs that emulate bf16): the screen's schedule, its own experiment names, and the
    recipe with autocast off and everything else unchanged."""
    import argparse
    cmd = block_study._command('screen_fp32', 'ldn_convtok', 0, block_study.STAGES['screen_fp32'])
    assert '--fp32' in cmd and cmd[cmd.index('--experiment') + 1] == 'screen_fp32_ldn_convtok_s0'
    assert cmd[cmd.index('--epochs') + 1] == str(block_study.STAGES['screen'])
    args = dict(config=train_fmnist.DEFAULT_RECIPE, epochs=None, batch_size=None, lr=None, seed=None, workers=None)
    base = train_fmnist.run_recipe(argparse.Namespace(**args, fp32=False))
    fp32 = train_fmnist.run_recipe(argparse.Namespace(**args, fp32=True))
    assert base['amp'] and not fp32['amp']
    assert {k: v for k, v in fp32.items() if k != 'amp'} == {k: v for k, v in base.items() if k != 'amp'}


def test_study_snapshots_travel_to_another_checkout(tmp_path, monkeypatch):
    """save_snapshots copies an unfinished run's checkpoint + log; restore puts them back for --resume."""
    runs, snaps = tmp_path / 'runs', tmp_path / 'checkpoints'
    monkeypatch.setattr(block_study, 'RUNS_DIR', runs)
    monkeypatch.setattr(block_study, 'SNAPSHOT_DIR', snaps)
    run = runs / 'final_ldn_v2_s0'
    run.mkdir(parents=True)
    (run / 'last.pth.tar').write_bytes(b'epoch 7')
    (run / 'model_best.pth.tar').write_bytes(b'epoch 6')
    (run / 'log.csv').write_text('epoch\n0\n')
    block_study.save_snapshots(['final_ldn_v2_s0', 'final_vit_s0'])  # a run without a checkpoint is skipped
    assert sorted(p.name for p in (snaps / 'final_ldn_v2_s0').iterdir()) == ['best.ckpt', 'last.ckpt', 'log.csv']
    assert not (snaps / 'final_vit_s0').exists()
    import shutil
    shutil.rmtree(runs)  # a fresh clone: only the committed snapshots exist
    block_study.restore()
    assert (run / 'last.pth.tar').read_bytes() == b'epoch 7' and (run / 'model_best.pth.tar').read_bytes() == b'epoch 6'
    (run / 'last.pth.tar').write_bytes(b'epoch 9')  # a run that got further here is never overwritten
    block_study.restore()
    assert (run / 'last.pth.tar').read_bytes() == b'epoch 9'


@pytest.mark.parametrize('name', SHIPPED)
def test_default_tag_is_the_v2_block_and_reproduces_its_manifest_probe(name):
    """Each architecture's untagged name resolves to its shipped tag, a v2-block model built without extra
    arguments; its logits match the exporter's fingerprint."""
    from timm_ldn import hub
    arch, tag = name.split('.')
    assert timm.models.get_pretrained_cfg(arch).tag == tag  # the default tag
    entry = hub.load_manifest()['weights'][name]
    assert entry['model_args'] == {} and entry['layout_version'] == 2
    model = timm.create_model(name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(hub.local_weight_file(name)))).eval()
    assert hasattr(model.blocks[0].mlp, 'dwconv')
    with torch.no_grad():
        logits = model(hub.probe_input(tuple(entry['input_size'])))[0]
    top = torch.topk(logits, 5)
    assert top.indices.tolist() == [i for i, _ in entry['probe']['top5']]
    torch.testing.assert_close(top.values, torch.tensor([v for _, v in entry['probe']['top5']]), rtol=0, atol=1e-4)


@pytest.mark.skipif(not fmnist_data.DEFAULT_SRC.is_dir(), reason='dataset-fashion-mnist not installed')
def test_study_speed_times_each_row_as_built_against_the_vit(tmp_path, monkeypatch):
    """``block_study.py speed`` trains every row with its own overrides and reports ratios to the ViT it adds."""
    monkeypatch.setattr(block_study, 'STUDY_DIR', tmp_path)
    built = []
    real_build = train_fmnist.build_model

    def spy(name, **kwargs):
        built.append(name)
        return real_build(name, **kwargs)

    monkeypatch.setattr(train_fmnist, 'build_model', spy)
    out = block_study.speed(['ldn_no_adiff'], threads=1, steps=1, rounds=1)
    assert built == ['vit', 'ldn_no_adiff']
    assert list(out['rows']) == ['vit', 'ldn_no_adiff'] and out['rows']['vit']['ratio_vs_vit'] == 1.
    assert out['rows']['ldn_no_adiff']['img_s'] > 0
    saved = json.loads((tmp_path / 'train_speed_1thread.json').read_text())
    assert saved['rows']['ldn_no_adiff']['ratio_vs_vit'] == out['rows']['ldn_no_adiff']['ratio_vs_vit']
    assert '| ldn_no_adiff |' in (tmp_path / 'train_speed_1thread.md').read_text()
