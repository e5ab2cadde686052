# The ingress in staging (nomad/traefik.nomad.hcl).
datacenters        = ["staging"]
ingress_node_class = "ingress"
ingress_count      = 2
