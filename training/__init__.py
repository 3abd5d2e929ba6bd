"""Train, evaluate and export a VAE (PyTorch). Never imported by the service."""
