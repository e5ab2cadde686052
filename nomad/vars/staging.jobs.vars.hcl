# jobs in staging (nomad/jobs.nomad.hcl). Secrets: Nomad Variable nomad/jobs/sdapi-jobs.
datacenters = ["staging"]
image       = "registry.example.org/sdapi/web:0.1.0"
public_url  = "https://staging.sdapi.example.org"
mail_from   = "sdapi <noreply@example.org>"
