# Redis for sdapi: arq queues, progress streams, announcements. Queued work
# must survive a restart (append-only file on a host volume) and must never be
# evicted to make room (noeviction: a full Redis refuses writes, loudly,
# rather than dropping jobs). PostgreSQL stays the source of truth: the
# reconciler re-enqueues whatever Redis loses anyway.
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/redis.nomad.hcl
#
# Clients find it as redis://sdapi-redis.service.consul/0.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters Redis may run in."
}

variable "redis_image" {
  type        = string
  default     = "redis:7.4"
  description = "The Redis image."
}

variable "redis_volume" {
  type        = string
  default     = "sdapi-redis"
  description = "The client host volume holding the append-only file."
}

variable "redis_memory" {
  type        = number
  default     = 2048
  description = "Memory of the task (MiB); maxmemory is set a little below it."
}

job "sdapi-redis" {
  datacenters = var.datacenters
  type        = "service"

  # One instance: a new version replaces it (queues wait on its file).
  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
  }

  group "redis" {
    count = 1

    network {
      mode = "host"
      port "redis" {
        static = 6379
      }
    }

    volume "data" {
      type      = "host"
      source    = var.redis_volume
      read_only = false
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    # The data lives on one machine's volume: only a machine with the same
    # host volume can take it over, so rescheduling elsewhere is bounded.
    reschedule {
      attempts       = 3
      interval       = "1h"
      delay          = "30s"
      delay_function = "constant"
      unlimited      = false
    }

    service {
      name     = "sdapi-redis"
      port     = "redis"
      provider = "consul"

      check {
        name     = "tcp"
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "redis" {
      driver = "docker"

      config {
        image        = var.redis_image
        network_mode = "host"
        args         = ["redis-server", "/local/redis.conf"]
      }

      volume_mount {
        volume      = "data"
        destination = "/data"
      }

      # SIGTERM: Redis fsyncs the append-only file before it exits.
      kill_timeout = "60s"

      template {
        destination = "local/redis.conf"
        change_mode = "restart"
        data        = <<-EOT
          port {{ env "NOMAD_PORT_redis" }}
          bind 0.0.0.0
          protected-mode no
          dir /data
          appendonly yes
          appendfsync everysec
          maxmemory ${var.redis_memory - 256}mb
          maxmemory-policy noeviction
        EOT
      }

      resources {
        cpu    = 1000
        memory = var.redis_memory
      }
    }
  }
}
