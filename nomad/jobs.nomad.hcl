# sdapi jobs: the CPU worker (docker/web.Dockerfile, command `jobs`): normal-tier
# dispatch, result storage, the email outbox, the reconciler and clean-up.
# It serves no port, so it has no Consul service: Nomad restarts it when it
# exits, and its health is the queue it drains (docs/DEPLOY.md, Metrics).
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/jobs.nomad.hcl
#
# Secrets come from the Nomad Variable nomad/jobs/sdapi-jobs (docs/DEPLOY.md):
# db_password, secret_key (the same as web's), smtp_url (with its credentials);
# and storage_url, s3_access_key_id, s3_secret_access_key as web's.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the worker may run in."
}

variable "image" {
  type        = string
  description = "The web/jobs image built from docker/web.Dockerfile (a digest or a tag)."
}

variable "jobs_count" {
  type        = number
  default     = 1
  description = "Workers; more than one is safe (row locks, SKIP LOCKED) but rarely needed."
}

variable "public_url" {
  type        = string
  description = "Base URL users reach the service at (links in emails)."
}

variable "mail_from" {
  type        = string
  description = "Sender of the service's emails, e.g. \"sdapi <sdapi@example.org>\"."
}

variable "jobs_cpu" {
  type        = number
  default     = 500
  description = "CPU (MHz)."
}

variable "jobs_memory" {
  type        = number
  default     = 512
  description = "Memory (MiB); emails carry their PNGs."
}

job "sdapi-jobs" {
  datacenters = var.datacenters
  type        = "service"

  # No checks to watch: healthy means the task kept running min_healthy_time.
  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "task_states"
    min_healthy_time  = "20s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
  }

  group "jobs" {
    count = var.jobs_count

    network {
      mode = "host"
    }

    restart {
      attempts = 5
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

    task "jobs" {
      driver = "docker"

      config {
        image        = var.image
        args         = ["jobs"]
        network_mode = "host"
      }

      # SIGTERM: arq re-queues what it was running at once, and everything
      # the worker does is idempotent, so a short grace is enough.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      template {
        destination = "secrets/sdapi.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          SDAPI_PUBLIC_URL=${var.public_url}
          SDAPI_MAIL_FROM="${var.mail_from}"
          SDAPI_LOG_LEVEL=INFO
          SDAPI_CONSUL_URL=http://127.0.0.1:8500
          SDAPI_REDIS_URL=redis://sdapi-redis.service.consul/0
          {{ with nomadVar "nomad/jobs/sdapi-jobs" -}}
          SDAPI_DATABASE_URL=postgres://sdapi:{{ .db_password }}@sdapi-postgres.service.consul/sdapi
          SDAPI_SECRET_KEY={{ .secret_key }}
          SDAPI_SMTP_URL={{ .smtp_url }}
          {{- with .storage_url }}
          SDAPI_STORAGE_URL={{ . }}
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
        cpu    = var.jobs_cpu
        memory = var.jobs_memory
      }
    }
  }
}
