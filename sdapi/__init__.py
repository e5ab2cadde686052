"""sdapi: Stable Diffusion as an API (command line and shared plumbing)."""
