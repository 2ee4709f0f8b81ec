"""Dataset loading, adapters to TRL formats, and harmful mixing."""

from .loading import get_dataset_adapter, load_named_dataset, load_role_dataset, register_dataset_adapter


__all__ = ["get_dataset_adapter", "load_named_dataset", "load_role_dataset", "register_dataset_adapter"]
