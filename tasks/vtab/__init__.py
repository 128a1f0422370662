"""VTAB-1K: the 19-task transfer benchmark (paper Tables 3, 8 and 11) as one command, ``vil vtab``.

``tasks``: the task definitions; ``data``: folder-format and tfds sources, the data module; ``module``: the
per-run fine-tuning module; ``sweep``: the command (scheduler, workers, records); ``report``: results, the
Table 8 layout and the chart; ``prepare``: tfds -> folder format. See tasks/vtab/README.md."""
