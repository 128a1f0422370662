"""Vision-LSTM backbones: ``vil.create_model(name, **overrides)`` and ``vil.list_models()``; after
``import vil`` the same variants are in timm's registry (``timm.create_model("vil2_tiny", ...)``)."""
from vil.checkpoint import load_checkpoint
from vil.flops import count_flops
from vil.mlstm import mlstm
from vil.registry import create_model, list_models
from vil.vision_lstm import VisionLSTM

__all__ = ["VisionLSTM", "count_flops", "create_model", "list_models", "load_checkpoint", "mlstm"]
