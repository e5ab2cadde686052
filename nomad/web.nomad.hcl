# sdapi web: the HTTP API, WebSocket, playground and docs (docker/web.Dockerfile).
# Stateless replicas behind Traefik (traefik.nomad.hcl), which routes to the
# healthy instances of the Consul service `sdapi-http` registered here. Each
# replica also registers itself as `sdapi-web` (sdapi's own registration,
# SDAPI_CONSUL_URL) and watches the healthy GPU nodes through Consul.
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/web.nomad.hcl
#
# Secrets come from the Nomad Variable nomad/jobs/sdapi-web (docs/DEPLOY.md):
# db_password, secret_key, metrics_token; and, for an image store other than
# PostgreSQL, storage_url, storage_redirect, s3_access_key_id and
# s3_secret_access_key (left out: images stay in PostgreSQL).

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the replicas may run in."
}

variable "image" {
  type        = string
  description = "The web/jobs image built from docker/web.Dockerfile (a digest or a tag)."
}

variable "web_count" {
  type        = number
  default     = 2
  description = "Web replicas; two or more so that a rolling update never leaves none."
}

variable "public_url" {
  type        = string
  description = "Base URL users reach the service at (links in emails, image URLs)."
}

variable "models" {
  type        = list(string)
  default     = ["tiny"]
  description = "Models accepted (and queued) even while no GPU node serves them."
}

variable "allowed_origins" {
  type        = list(string)
  default     = []
  description = "Extra origins allowed to open the WebSocket (the public URL always is)."
}

variable "web_cpu" {
  type        = number
  default     = 1000
  description = "CPU per replica (MHz); bcrypt hashing is the largest user."
}

variable "web_memory" {
  type        = number
  default     = 512
  description = "Memory per replica (MiB)."
}

job "sdapi-web" {
  datacenters = var.datacenters
  type        = "service"

  # One canary replica of a new version first; promoted once its /readyz has
  # passed for min_healthy_time, reverted to the last good version otherwise.
  update {
    max_parallel      = 1
    canary            = 1
    auto_promote      = true
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "15s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
  }

  group "web" {
    count = var.web_count

    # Host networking: the replica listens on the port Nomad picks and
    # registers that same address in Consul.
    network {
      mode = "host"
      port "http" {}
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "10m"
      unlimited      = true
    }

    # Two replicas never share a machine while there are machines enough.
    spread {
      attribute = "${node.unique.id}"
    }

    service {
      name     = "sdapi-http"
      port     = "http"
      provider = "consul"
      # Traefik (traefik.nomad.hcl) reads these from the Consul catalog. A
      # WebSocket upgrade is plain HTTP to Traefik: no extra router is needed.
      tags = [
        "traefik.enable=true",
        "traefik.http.routers.sdapi.rule=PathPrefix(`/`)",
        "traefik.http.routers.sdapi.entrypoints=web",
        "traefik.http.services.sdapi.loadbalancer.healthcheck.path=/readyz",
        "traefik.http.services.sdapi.loadbalancer.healthcheck.interval=10s",
        "traefik.http.services.sdapi.loadbalancer.healthcheck.timeout=3s",
        "prometheus",
      ]
      meta {
        metrics_path = "/metrics"
      }

      # Ready: PostgreSQL and Redis answer (the body also says whether Consul
      # does; a replica keeps serving its last view of the GPU nodes if not).
      check {
        name     = "ready"
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"

        # A replica that stays unready is restarted, not just taken out.
        check_restart {
          limit           = 6
          grace           = "60s"
          ignore_warnings = true
        }
      }

      # Alive: the event loop answers, whatever its dependencies do.
      check {
        name     = "alive"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    # Migrations run to completion before the replica (or a canary) starts;
    # they only add, so the replicas still on the old version keep working.
    task "migrate" {
      driver = "docker"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        image        = var.image
        args         = ["migrate"]
        network_mode = "host"
      }

      template {
        destination = "secrets/sdapi.env"
        env         = true
        change_mode = "noop"
        data        = <<-EOT
          SDAPI_CONSUL_URL=http://127.0.0.1:8500
          {{ with nomadVar "nomad/jobs/sdapi-web" -}}
          SDAPI_DATABASE_URL=postgres://sdapi:{{ .db_password }}@sdapi-postgres.service.consul/sdapi
          SDAPI_SECRET_KEY={{ .secret_key }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }

    task "web" {
      driver = "docker"

      config {
        image        = var.image
        args         = ["web"]
        network_mode = "host"
      }

      # SIGTERM: aiohttp stops accepting, finishes requests and closes the
      # WebSockets (clients reconnect to another replica and replay).
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      # All configuration in one template: the job's variables, Nomad's port,
      # the node-local Consul agent, services by Consul name (sdapi resolves
      # `<name>.service.consul` hosts through the agent) and the secrets.
      template {
        destination = "secrets/sdapi.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          SDAPI_PORT={{ env "NOMAD_PORT_http" }}
          SDAPI_HOST=0.0.0.0
          SDAPI_PUBLIC_URL=${var.public_url}
          SDAPI_MODELS=${join(",", var.models)}
          SDAPI_ALLOWED_ORIGINS=${join(",", var.allowed_origins)}
          SDAPI_TRUST_FORWARDED=true
          # Longer than Traefik keeps an idle connection to us (90 s): else it
          # may reuse one as we close it, and answer 502.
          SDAPI_KEEPALIVE_TIMEOUT=120
          SDAPI_LOG_LEVEL=INFO
          SDAPI_ADVERTISE_HOST={{ env "NOMAD_IP_http" }}
          SDAPI_CONSUL_URL=http://127.0.0.1:8500
          SDAPI_REDIS_URL=redis://sdapi-redis.service.consul/0
          {{ with nomadVar "nomad/jobs/sdapi-web" -}}
          SDAPI_DATABASE_URL=postgres://sdapi:{{ .db_password }}@sdapi-postgres.service.consul/sdapi
          SDAPI_SECRET_KEY={{ .secret_key }}
          SDAPI_METRICS_TOKEN={{ .metrics_token }}
          {{- with .storage_url }}
          SDAPI_STORAGE_URL={{ . }}
          {{- end }}
          {{- with .storage_redirect }}
          SDAPI_STORAGE_REDIRECT={{ . }}
          {{- end }}
          {{- with .s3_access_key_id }}
          AWS_ACCESS_KEY_ID={{ . }}
          {{- end }}
          {{- with .s3_secret_access_key }}
          AWS_SECRET_ACCESS_KEY={{ . }}
          {{- end }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = var.web_cpu
        memory = var.web_memory
      }
    }
  }
}
