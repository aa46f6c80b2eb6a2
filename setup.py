"""Build steps that pyproject.toml cannot express (all metadata is in pyproject.toml).

1. ``weights/`` -> ``timm_ldn/weights/`` in the wheel: the manifest (sha256 of every published file), the weight
   files it ships (``local_file``, with a ``config.json`` beside it for sequence models) and the sample images. ``weights/`` at the repository root stays the one
   source (``ldn export`` writes there; a checkout / editable install reads it in place, see
   ``timm_ldn.hub.weights_dir``); the sdist carries it through MANIFEST.in.
2. ``timm_ldn_autoregister.pth`` into site-packages. A ``.pth`` file must sit at the top level of
   site-packages, which package data cannot reach, so ``build_py`` writes it: into ``build_lib`` for a regular
   wheel (``pip install .``), and straight into the editable wheel's root for ``pip install -e .`` (setuptools'
   editable build does not copy ``build_lib``). The line it contains is run by ``site`` at every interpreter
   start; see ``_timm_ldn_autoregister.py``.
"""
import json
import os
import shutil
from typing import List, Tuple

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = 'timm_ldn_autoregister.pth'
# One line, executed by site.py at start-up: only os (already loaded) unless the hook is wanted; an
# ImportError (e.g. an editable checkout that was deleted) is ignored instead of printing a traceback.
PTH_LINE = (
    "import os; os.environ.get('TIMM_LDN_NO_AUTOREGISTER', '') in ('', '0') and exec("
    "'try:\\n import _timm_ldn_autoregister as _m\\nexcept ImportError:\\n _m = None\\n"
    "_m is None or _m.install()')\n"
)

WEIGHTS_SRC = 'weights'
WEIGHTS_DST = os.path.join('timm_ldn', 'weights')


def packaged_weights() -> List[Tuple[str, str]]:
    """(source, path inside the wheel) for the manifest, every weight file it ships and the sample images."""
    manifest = os.path.join(WEIGHTS_SRC, 'manifest.json')
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f'{manifest} is missing: build from a checkout or an sdist of timm-ldn.')
    with open(manifest, encoding='utf-8') as f:
        entries = json.load(f).get('weights', {}).values()
    names = ['manifest.json'] + [e['local_file'] for e in entries if e.get('local_file')]
    # a non-timm module's shipped copy (timm_ldn.sequence.load_published) is rebuilt from the config.json beside it
    names += [c for c in (os.path.join(os.path.dirname(n), 'config.json') for n in names[1:])
              if os.path.isfile(os.path.join(WEIGHTS_SRC, c))]
    samples = os.path.join(WEIGHTS_SRC, 'samples')
    if os.path.isdir(samples):
        names += [f'samples/{n}' for n in sorted(os.listdir(samples)) if os.path.isfile(os.path.join(samples, n))]
    for name in names:
        if not os.path.isfile(os.path.join(WEIGHTS_SRC, name)):
            raise FileNotFoundError(f'{WEIGHTS_SRC}/{name} (listed in the manifest) is missing.')
    return [(os.path.join(WEIGHTS_SRC, n), os.path.join(WEIGHTS_DST, n)) for n in names]


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, 'editable_mode', False):  # an editable install reads weights/ in place
            for src, dst in packaged_weights():
                target = os.path.join(self.build_lib, dst)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(src, target)
        if getattr(self, 'editable_mode', False):
            # editable_wheel points install_lib at the unpacked wheel it zips up
            target_dir = self.get_finalized_command('install').install_lib
        else:
            target_dir = self.build_lib
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, PTH_NAME)
        with open(target, 'w', encoding='utf-8') as f:
            f.write(PTH_LINE)
        self._pth_output = target

    def get_outputs(self, include_bytecode: bool = True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, 'editable_mode', False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
            outputs += [os.path.join(self.build_lib, dst) for _, dst in packaged_weights()]
        return outputs


setup(cmdclass={'build_py': build_py_with_pth})
