"""A stand-in for ``mmcv.ops`` under mmcv-lite.

Why: mmsegmentation 1.2 imports a few names from ``mmcv.ops`` at module level (``point_sample`` in
``mmseg.models.utils`` and ``mmseg.utils``, ``sigmoid_focal_loss`` in its losses), and the real ``mmcv.ops``
package loads the compiled extension ``mmcv._ext`` on import. mmcv-lite ships no extension, the full mmcv has no
wheel for our torch, and its source build takes about 25 minutes; UperNet, FCN, Feature2Pyramid, the ADE20K
pipeline and IoUMetric use no compiled op. So before mmseg is imported, ``install`` registers a module named
``mmcv.ops`` that serves ``point_sample`` from mmcv's own pure-PyTorch file (mmcv/ops/point_sample.py, loaded
without the package's ``__init__``); every other name is a placeholder that raises an error saying what is
missing when it is called (mmseg imports some at module level, e.g. ``sigmoid_focal_loss``, without using them).

When the real extension is importable (a full mmcv), nothing is installed. ``needs_stand_in`` tells whether
mmseg still fails without it (tests/test_segmentation.py checks that it does, so that this module is removed
once mmseg stops needing it).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

_NAME = "mmcv.ops"


class MissingCompiledOp(ModuleNotFoundError):
    """An mmcv op that needs the compiled extension mmcv-lite does not ship."""


def _missing_op(name: str):
    def missing(*args, **kwargs):
        raise MissingCompiledOp(
            f"mmcv.ops.{name} needs mmcv's compiled extension (mmcv._ext), which mmcv-lite does not ship; "
            f"the ViL segmentation models use no compiled op. Install the full mmcv (built from source) for "
            f"mmseg models that need {name}.", name=f"{_NAME}.{name}")

    missing.__name__ = missing.__qualname__ = name
    return missing


def _module_getattr(name: str):
    if name.startswith("__"):  # probes such as __file__ or __wrapped__ expect AttributeError
        raise AttributeError(name)
    return _missing_op(name)


def has_compiled_ops() -> bool:
    return importlib.util.find_spec("mmcv") is not None and importlib.util.find_spec("mmcv._ext") is not None


def install() -> None:
    """Register the stand-in as ``mmcv.ops`` (once; not when the compiled extension exists)."""
    if _NAME in sys.modules or has_compiled_ops():
        return
    import mmcv

    ops_dir = os.path.join(os.path.dirname(mmcv.__file__), "ops")
    module = types.ModuleType(_NAME, __doc__)
    module.__path__ = [ops_dir]  # submodules (mmcv.ops.point_sample) load from mmcv's files
    module.__getattr__ = _module_getattr
    module.__stand_in__ = True
    sys.modules[_NAME] = module
    mmcv.ops = module
    from mmcv.ops.point_sample import point_sample  # pure PyTorch (F.grid_sample); no extension needed

    module.point_sample = point_sample


def needs_stand_in() -> bool:
    """Whether ``import mmseg.models`` still fails without the stand-in (checked in a fresh interpreter)."""
    probe = "import mmseg.models, mmseg.datasets, mmseg.evaluation"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    return result.returncode != 0 and "mmcv._ext" in result.stderr
