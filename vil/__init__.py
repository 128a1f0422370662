"""Vision-LSTM backbones: ``vil.create_model(name, **overrides)`` and ``vil.list_models()``."""
from vil import vision_lstm as _models  # noqa: F401  (registers the model configurations)
from vil.checkpoint import load_checkpoint
from vil.flops import count_flops
from vil.mlstm import mlstm
from vil.registry import create_model, list_models, model_config
from vil.vision_lstm import VisionLSTM

__all__ = ["VisionLSTM", "count_flops", "create_model", "list_models", "load_checkpoint", "mlstm", "model_config"]
