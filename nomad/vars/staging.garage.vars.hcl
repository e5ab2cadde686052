# The image store in staging (nomad/garage.nomad.hcl): one node, one copy. Secrets: Nomad Variable nomad/jobs/sdapi-garage.
datacenters        = ["staging"]
garage_count       = 1
replication_factor = 1
s3_host            = "s3.staging.sdapi.example.org"
garage_memory      = 512
