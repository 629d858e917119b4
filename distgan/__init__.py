"""distgan: DCGAN-style GAN training from one CPU to many GPUs on many nodes."""

__version__ = "0.1.0"
