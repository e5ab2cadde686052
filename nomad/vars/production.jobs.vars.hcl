# jobs in production (nomad/jobs.nomad.hcl). Secrets: Nomad Variable nomad/jobs/sdapi-jobs.
datacenters = ["dc1"]
image       = "registry.example.org/sdapi/web:0.1.0"
public_url  = "https://sdapi.example.org"
mail_from   = "sdapi <noreply@example.org>"
