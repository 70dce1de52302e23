"""fedsecure: privacy and security for federated fine-tuning of LLMs."""

__version__ = "0.1.0"
