"""The GPU node: diffusers pipelines behind arq queues, announced in Consul."""
