"""fedtrain: federated, low-bandwidth LLM training across institutional silos."""

__version__ = "0.1.0"
__all__ = ["__version__"]
