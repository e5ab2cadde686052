# The image store in production (nomad/garage.nomad.hcl). Secrets: Nomad Variable nomad/jobs/sdapi-garage.
datacenters        = ["dc1"]
garage_count       = 3
replication_factor = 3
s3_host            = "s3.sdapi.example.org"
garage_memory      = 2048
