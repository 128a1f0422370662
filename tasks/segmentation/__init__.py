"""ADE20K semantic segmentation with a ViL backbone through mmsegmentation: the ``ViL`` backbone in mmseg's
registry (``backbone``), the ADEChallengeData2016 data module (``data``), the UperNet training module
(``module``) and ``vil segment predict`` (``predict``). See README.md in this folder.

Importing this package installs the ``mmcv.ops`` stand-in (``mmcv_ops``) that mmseg needs under mmcv-lite;
it must come before mmseg's first import, so every module here is imported through this package."""
from tasks.segmentation import mmcv_ops

mmcv_ops.install()
