# PostgreSQL in production (nomad/postgres.nomad.hcl). Password: Nomad Variable nomad/jobs/sdapi-postgres.
datacenters     = ["dc1"]
postgres_memory = 4096
