# web in production (nomad/web.nomad.hcl). Secrets: Nomad Variable nomad/jobs/sdapi-web.
datacenters     = ["dc1"]
image           = "registry.example.org/sdapi/web:0.1.0"
web_count       = 3
public_url      = "https://sdapi.example.org"
models          = ["tiny"]
allowed_origins = []
