# web in staging (nomad/web.nomad.hcl). Secrets: Nomad Variable nomad/jobs/sdapi-web.
datacenters     = ["staging"]
image           = "registry.example.org/sdapi/web:0.1.0"
web_count       = 2
public_url      = "https://staging.sdapi.example.org"
models          = ["tiny"]
allowed_origins = []
