"""uniflow: UniFLoW multimodal federated LoRA fine-tuning as a command-line suite over adapter files."""

__version__ = "0.1.0"
