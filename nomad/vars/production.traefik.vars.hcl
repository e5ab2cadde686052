# The ingress in production (nomad/traefik.nomad.hcl).
datacenters        = ["dc1"]
ingress_node_class = "ingress"
ingress_count      = 2
