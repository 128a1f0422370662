"""The digits task: scikit-learn's handwritten digits (``tasks.digits.data``) and the embedded default job
(``python -m tasks.digits``: fit with experiments/digits/vil_digits.yaml, then test the best checkpoint)."""
