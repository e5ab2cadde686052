# PostgreSQL for sdapi: users, generations, images, the email outbox; the
# source of truth. The data directory is a host volume (the machine's own
# disk), so the database survives restarts and upgrades of this job. Back it
# up as docs/DEPLOY.md says.
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/postgres.nomad.hcl
#
# The password comes from the Nomad Variable nomad/jobs/sdapi-postgres
# (db_password, the same value as web's and jobs'). Clients find it as
# postgres://sdapi:...@sdapi-postgres.service.consul/sdapi.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters PostgreSQL may run in."
}

variable "postgres_image" {
  type        = string
  default     = "postgres:17"
  description = "The PostgreSQL image; a major upgrade needs pg_upgrade or a dump and restore."
}

variable "postgres_volume" {
  type        = string
  default     = "sdapi-postgres"
  description = "The client host volume holding the data directory."
}

variable "postgres_memory" {
  type        = number
  default     = 2048
  description = "Memory (MiB)."
}

job "sdapi-postgres" {
  datacenters = var.datacenters
  type        = "service"

  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "5m"
    progress_deadline = "15m"
  }

  group "postgres" {
    count = 1

    network {
      mode = "host"
      port "db" {
        static = 5432
      }
    }

    volume "data" {
      type      = "host"
      source    = var.postgres_volume
      read_only = false
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    # Bound to the machine with the volume: a few tries, then an operator.
    reschedule {
      attempts       = 3
      interval       = "1h"
      delay          = "30s"
      delay_function = "constant"
      unlimited      = false
    }

    service {
      name     = "sdapi-postgres"
      port     = "db"
      provider = "consul"

      check {
        name     = "tcp"
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "postgres" {
      driver = "docker"

      config {
        image        = var.postgres_image
        network_mode = "host"
        args         = ["-c", "port=${NOMAD_PORT_db}", "-c", "max_connections=200"]
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/postgresql/data"
      }

      # SIGTERM is PostgreSQL's "smart" shutdown: give sessions time to end.
      kill_signal  = "SIGTERM"
      kill_timeout = "90s"

      env {
        POSTGRES_USER = "sdapi"
        POSTGRES_DB   = "sdapi"
        PGDATA        = "/var/lib/postgresql/data/pgdata"
      }

      template {
        destination = "secrets/postgres.env"
        env         = true
        change_mode = "noop"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/sdapi-postgres" -}}
          POSTGRES_PASSWORD={{ .db_password }}
          {{- end }}
        EOT
      }

      resources {
        cpu    = 2000
        memory = var.postgres_memory
      }
    }
  }
}
