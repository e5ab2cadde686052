# Redis in production (nomad/redis.nomad.hcl).
datacenters  = ["dc1"]
redis_memory = 4096
