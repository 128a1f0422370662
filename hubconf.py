"""torch.hub entry points, one per ViL variant:

    torch.hub.load("path/to/checkout", "vil2_tiny", source="local", pretrained=True)

Arguments are ``vil.create_model``'s (timm's): num_classes, img_size, features_only, checkpoint, ...
"""
import vil as _vil

dependencies = ["torch", "timm"]


def _entry(name: str):
    def entry(pretrained: bool = False, **kwargs):
        return _vil.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{name} (vil.create_model({name!r}, pretrained=..., **kwargs))"
    return entry


for _name in _vil.list_models():
    globals()[_name] = _entry(_name)
