# Redis in staging (nomad/redis.nomad.hcl).
datacenters  = ["staging"]
redis_memory = 1024
