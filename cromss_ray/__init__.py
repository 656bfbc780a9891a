"""CromSS on Ray: multimodal noisy-label segmentation pretraining, tracked in MLflow."""

__version__ = "0.1.0"
