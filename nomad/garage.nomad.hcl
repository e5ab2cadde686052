# Garage (garagehq.deuxfleurs.fr): the S3-compatible image store, for
# SDAPI_STORAGE_URL=s3://... (docs/DEPLOY.md, "Image storage").
#
# Why Garage: MinIO's open-source server is archived; Garage is actively
# maintained (Deuxfleurs; v2 in 2025), one static binary with small needs
# (no JVM, no separate metadata or volume servers as SeaweedFS has), built to
# replicate every object on machines of its own (replication_factor) and
# speaking the S3 API sdapi uses: PutObject, GetObject, DeleteObjects and
# SigV4-presigned GETs, checked by Garage against its own key secrets. Its
# nodes find each other through the local Consul agent.
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/garage.nomad.hcl
#
# Secrets come from the Nomad Variable nomad/jobs/sdapi-garage: rpc_secret
# (32 bytes, hex; the nodes' shared key) and admin_token. After the first
# start an operator assigns the layout and creates the bucket and sdapi's key
# once (docs/DEPLOY.md). Users download presigned URLs through Traefik at
# var.s3_host, the same host web and jobs reach the store at, so the host a
# URL is signed for is the host Garage sees.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the storage nodes may run in."
}

variable "garage_image" {
  type        = string
  default     = "dxflrs/garage:v2.1.0"
  description = "The Garage image; read Garage's upgrade notes before a major version."
}

variable "garage_count" {
  type        = number
  default     = 3
  description = "Storage nodes, each on its own machine with the host volume."
}

variable "replication_factor" {
  type        = number
  default     = 3
  description = "Copies of each object, on distinct nodes; at most garage_count. Fixed once data is stored."
}

variable "garage_volume" {
  type        = string
  default     = "sdapi-garage"
  description = "The client host volume holding the metadata and the objects."
}

variable "s3_host" {
  type        = string
  description = "Public host name of the S3 endpoint, routed by Traefik (presigned URLs point there)."
}

variable "s3_region" {
  type        = string
  default     = "garage"
  description = "The region name Garage signs for; the region= of SDAPI_STORAGE_URL."
}

variable "garage_memory" {
  type        = number
  default     = 1024
  description = "Memory per node (MiB)."
}

job "sdapi-garage" {
  datacenters = var.datacenters
  type        = "service"

  # One node at a time: with three copies, two always answer.
  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "30s"
    healthy_deadline  = "5m"
    progress_deadline = "15m"
  }

  group "garage" {
    count = var.garage_count

    # Copies of an object must never share a machine.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      mode = "host"
      port "s3" {
        static = 3900
      }
      port "rpc" {
        static = 3901
      }
      port "admin" {
        static = 3903
      }
    }

    volume "data" {
      type      = "host"
      source    = var.garage_volume
      read_only = false
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    # Bound to the machines with the volume: a few tries, then an operator.
    reschedule {
      attempts       = 3
      interval       = "1h"
      delay          = "30s"
      delay_function = "constant"
      unlimited      = false
    }

    service {
      name     = "sdapi-s3"
      port     = "s3"
      provider = "consul"
      # Traefik routes the store's host here (not to web): a Host rule is
      # longer than web's PathPrefix(`/`), so it wins.
      tags = [
        "traefik.enable=true",
        "traefik.http.routers.sdapi-s3.rule=Host(`${var.s3_host}`)",
        "traefik.http.routers.sdapi-s3.entrypoints=web",
      ]

      # Garage's own health: 200 while this node can serve requests (enough
      # of the cluster answers for the replication factor).
      check {
        name     = "health"
        type     = "http"
        port     = "admin"
        path     = "/health"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "garage" {
      driver = "docker"

      config {
        image        = var.garage_image
        network_mode = "host"
        command      = "/garage"
        args         = ["-c", "/secrets/garage.toml", "server"]
      }

      volume_mount {
        volume      = "data"
        destination = "/var/lib/garage"
      }

      # Lets requests in flight finish.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      template {
        destination = "secrets/garage.toml"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/sdapi-garage" -}}
          metadata_dir = "/var/lib/garage/meta"
          data_dir = "/var/lib/garage/data"
          db_engine = "lmdb"
          metadata_auto_snapshot_interval = "6h"
          replication_factor = ${var.replication_factor}
          consistency_mode = "consistent"
          rpc_secret = "{{ .rpc_secret }}"
          rpc_bind_addr = "0.0.0.0:{{ env "NOMAD_PORT_rpc" }}"
          rpc_public_addr = "{{ env "NOMAD_IP_rpc" }}:{{ env "NOMAD_PORT_rpc" }}"

          [consul_discovery]
          api = "agent"
          consul_http_addr = "http://127.0.0.1:8500"
          service_name = "sdapi-garage-rpc"

          [s3_api]
          api_bind_addr = "0.0.0.0:{{ env "NOMAD_PORT_s3" }}"
          s3_region = "${var.s3_region}"

          [admin]
          api_bind_addr = "0.0.0.0:{{ env "NOMAD_PORT_admin" }}"
          admin_token = "{{ .admin_token }}"
          {{- end }}
        EOT
      }

      resources {
        cpu    = 1000
        memory = var.garage_memory
      }
    }
  }
}
