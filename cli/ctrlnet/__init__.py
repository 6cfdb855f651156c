"""ctrlnet: train ControlNet adapters for Stable Diffusion, locally or on Kubernetes."""

__version__ = "0.1.0"
