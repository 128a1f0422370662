"""Downstream tasks built on ``vil.module.BackboneModule``: classification (ImageNet-1K, digits), and the
data modules that feed them."""
