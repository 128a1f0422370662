"""Training on ViL backbones with Lightning, kept apart from the model package ``vil`` (which never imports
Lightning):

- ``tasks.base``: ``BackboneModule``, the LightningModule every task builds on (optimizer, schedule, EMA, compile).
- ``tasks.classification``: the classification module shared by the classification tasks.
- ``tasks.cli``: the ``vil`` command line (LightningCLI's fit/validate/test/predict plus extra commands).
- ``tasks.callbacks`` and ``tasks.loggers``: shared callbacks and the run-folder logger.
- one sub-package per task with its data module and job, e.g. ``tasks.digits`` (``python -m tasks.digits``).
"""
