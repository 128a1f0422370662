"""ImageNet-1K: the paper's Table 1 recipe (``tasks.imagenet.data``: ImageFolder data module with the Table 10
augmentations; ``tasks.imagenet.module``: classification with the recipe's checks), evaluation of the released
weights and the robustness table of Table 9 (``tasks.imagenet.robustness``, the ``vil robustness`` command).
Configs and launch commands: experiments/imagenet/ and tasks/imagenet/README.md."""
