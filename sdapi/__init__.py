"""sdapi: Stable Diffusion as an API (command line and shared plumbing)."""

__version__ = "0.1.0"
