# PostgreSQL in staging (nomad/postgres.nomad.hcl). Password: Nomad Variable nomad/jobs/sdapi-postgres.
datacenters     = ["staging"]
postgres_memory = 1024
