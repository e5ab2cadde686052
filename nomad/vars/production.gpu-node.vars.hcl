# GPU nodes in production (nomad/gpu-node.nomad.hcl), with one of vars/models/*.vars.hcl.
datacenters = ["dc1"]
gpu_image   = "registry.example.org/sdapi/gpu-node:0.1.0"
gpu_max     = 8
