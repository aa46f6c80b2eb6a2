"""Build step that ships ``timm_ldn_autoregister.pth`` into site-packages (all metadata is in pyproject.toml).

A ``.pth`` file must sit at the top level of site-packages, which package data cannot reach, so
``build_py`` writes it: into ``build_lib`` for a regular wheel (``pip install .``), and straight into the
editable wheel's root for ``pip install -e .`` (setuptools' editable build does not copy ``build_lib``).
The line it contains is run by ``site`` at every interpreter start; see ``_timm_ldn_autoregister.py``.
"""
import os

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


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
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
        return outputs


setup(cmdclass={'build_py': build_py_with_pth})
