"""Register timm-ldn's ``ldn_*`` models in timm's registry as soon as any process imports ``timm``.

timm's own scripts (``train.py``, ``validate.py``, ``benchmark.py``, ``inference.py``) never import
``timm_ldn``, so without this ``create_model('ldn_small')`` ends in ``Unknown model``. The wheel ships
``timm_ldn_autoregister.pth`` next to this module in site-packages; Python's ``site`` runs its one line at
start-up, which calls :func:`install`. That only puts a small finder at the front of ``sys.meta_path``:
nothing else is imported (no torch, no timm), so start-up cost is a fraction of a millisecond.
When ``timm`` itself is imported later, the finder wraps its loader once, lets timm execute normally
and then imports ``timm_ldn`` (whose ``@register_model`` functions fill the registry), and removes
itself from ``sys.meta_path``.

Switch it off with the environment variable ``TIMM_LDN_NO_AUTOREGISTER=1`` (any value other than
empty or ``0``); then register explicitly with ``import timm_ldn`` or ``train.py --device-modules timm_ldn``.

This is a top-level module on purpose: importing ``timm_ldn._autoregister`` would run
``timm_ldn/__init__.py``, which imports torch.
"""
import os
import sys

ENV_VAR = 'TIMM_LDN_NO_AUTOREGISTER'
TARGET = 'timm'
PLUGIN = 'timm_ldn'


def disabled() -> bool:
    return os.environ.get(ENV_VAR, '') not in ('', '0')


def _register() -> None:
    """Import the plugin package, which registers its models; never break the user's ``import timm``."""
    if disabled() or PLUGIN in sys.modules:
        return
    try:
        __import__(PLUGIN)
    except Exception as e:  # a broken plugin must not make timm unusable
        import warnings
        warnings.warn(
            f'timm-ldn: automatic registration of the ldn_* models failed ({e!r}). '
            f'Import {PLUGIN} explicitly to see the full error, or set {ENV_VAR}=1 to silence this.',
            RuntimeWarning, stacklevel=2)


class _PostImportLoader:
    """Delegates to timm's real loader, then registers the plugin once timm's ``__init__`` has run."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # put the real loader back first so timm (and importlib.resources etc.) only ever see their own
        module.__loader__ = self._loader
        if getattr(module, '__spec__', None) is not None:
            module.__spec__.loader = self._loader
        _uninstall()  # timm is being imported for real: the finder's job is done
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _TimmImportFinder:
    """A ``sys.meta_path`` finder that only reacts to the top-level name ``timm``, removed once timm is imported.

    It stays installed through mere probes: ``importlib.util.find_spec('timm')`` (transformers' availability
    check, for one) asks the finders for a spec without loading it; removing the finder there would leave the
    real ``import timm`` that follows without ``ldn_*``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        if disabled() or TARGET in sys.modules:
            self.uninstall()
            return None
        for finder in sys.meta_path:  # the finders that would have handled timm without us
            if isinstance(finder, _TimmImportFinder):  # ourselves (no recursion)
                continue
            find_spec = getattr(finder, 'find_spec', None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _PostImportLoader(spec.loader)
                return spec
        return None

    def uninstall(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def _uninstall() -> None:
    for finder in [f for f in sys.meta_path if isinstance(f, _TimmImportFinder)]:
        finder.uninstall()


def install() -> None:
    """Called from the ``.pth`` file at interpreter start-up."""
    if disabled():
        return
    if TARGET in sys.modules:  # already imported (e.g. install() called late by hand): register now
        _register()
        return
    if any(isinstance(f, _TimmImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TimmImportFinder())
