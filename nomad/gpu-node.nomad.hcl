# sdapi GPU nodes of one model (docker/gpu-node.Dockerfile, command `gpu-node`).
# One job per model: the job's ID is a literal in HCL, so run this file under
# the model's own ID (docs/DEPLOY.md, "Adding a model"):
#
#   sed 's/^job "sdapi-gpu"/job "sdapi-gpu-sdxl"/' nomad/gpu-node.nomad.hcl |
#     nomad job run -var-file=nomad/vars/production.vars.hcl \
#       -var-file=nomad/vars/models/sdxl.vars.hcl -
#
# Each node registers itself in Consul as `sdapi-gpu` (Meta: model, GPU,
# memory, max batch) with a TTL check it keeps passing, and web and jobs
# watch those. The `sdapi-gpu-health` service below is Nomad's own view of
# the node (deployment health, restarts, Prometheus scraping).
# The node needs no secret: Redis is reached on the cluster's network only.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the nodes may run in."
}

variable "gpu_image" {
  type        = string
  description = "The GPU node image built from docker/gpu-node.Dockerfile (a digest or a tag)."
}

variable "model" {
  type        = string
  description = "`tiny`, or a Hugging Face repo id downloaded once per machine into the weights volume."
}

variable "model_name" {
  type        = string
  description = "The name clients ask for (queues, Consul Meta, the scaling query); one job per name."
}

variable "gpu_count" {
  type        = number
  default     = 1
  description = "Nodes when the job is first run; the autoscaler moves it within [gpu_min, gpu_max]."
}

variable "gpu_min" {
  type        = number
  default     = 0
  description = "Fewest nodes; 0 lets an idle model scale to zero (its requests queue meanwhile)."
}

variable "gpu_max" {
  type        = number
  default     = 4
  description = "Most nodes the autoscaler may run."
}

variable "gpu_memory_min" {
  type        = string
  default     = "16 GiB"
  description = "Least memory of the GPU a node is placed on (a Nomad device attribute value)."
}

variable "queue_per_node" {
  type        = number
  default     = 4
  description = "Queued generations per node the autoscaler aims at (a premium job is one request, a batch job up to max batch)."
}

variable "drain_grace_s" {
  type        = number
  default     = 60
  description = "On stop, how long running work may finish before it is handed back (seconds)."
}

variable "weights_volume" {
  type        = string
  default     = "sdapi-models"
  description = "The client host volume holding downloaded weights (one download per machine)."
}

variable "gpu_cpu" {
  type        = number
  default     = 4000
  description = "CPU (MHz): PNG encoding and previews."
}

variable "gpu_memory" {
  type        = number
  default     = 16384
  description = "Host memory (MiB): an SDXL pipeline loads through host memory."
}

job "sdapi-gpu" {
  datacenters = var.datacenters
  type        = "service"

  # A node takes minutes to start (weights load); a new version replaces one
  # node at a time so the model keeps capacity, and reverts if it never gets
  # healthy. GPU nodes roll out before web and jobs (docs/DEPLOY.md).
  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "30s"
    healthy_deadline  = "15m"
    progress_deadline = "30m"
  }

  group "node" {
    count = var.gpu_count

    scaling {
      enabled = true
      min     = var.gpu_min
      max     = var.gpu_max

      policy {
        evaluation_interval = "30s"
        # Long enough for a new node to load its model and start draining
        # the queue before the next decision.
        cooldown = "3m"

        # Queued (and running) work per healthy node; from zero nodes the
        # division by at least one makes it the whole queue, so the
        # target-value strategy starts ceil(queue / target) nodes. web
        # exports the same global value from every replica: max() dedupes.
        # Normal-tier rows waiting in PostgreSQL count as one, at most: they
        # are only dispatched to a model that has a node, so they keep (or
        # bring back) one node without inflating the count. `or vector(0)`:
        # a series not exported yet reads as 0, not as no value.
        check "queue_depth" {
          source = "prometheus"
          query  = "((sum(max by (tier) (sdapi_queue_depth{model=\"${var.model_name}\"})) or vector(0)) + clamp_max(max(sdapi_scheduled_generations{model=\"${var.model_name}\"}) or vector(0), 1)) / clamp_min(max(sdapi_healthy_gpu_nodes{model=\"${var.model_name}\"}) or vector(0), 1)"

          strategy "target-value" {
            target = var.queue_per_node
          }
        }
      }
    }

    network {
      mode = "host"
      port "health" {}
    }

    # Weights live on the machine: a node that restarts or moves back finds
    # them, and only a new machine downloads.
    volume "weights" {
      type      = "host"
      source    = var.weights_volume
      read_only = false
    }

    restart {
      attempts = 2
      interval = "10m"
      delay    = "30s"
      mode     = "delay"
    }

    reschedule {
      delay          = "1m"
      delay_function = "exponential"
      max_delay      = "15m"
      unlimited      = true
    }

    service {
      name     = "sdapi-gpu-health"
      port     = "health"
      provider = "consul"
      tags     = ["model-${var.model_name}", "prometheus"]
      meta {
        metrics_path = "/metrics"
        model        = var.model_name
      }

      # 200 once the model is loaded and the queue workers run.
      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          # Loading weights (and the first download) comes before healthy.
          grace = "15m"
        }
      }
    }

    task "gpu-node" {
      driver = "docker"

      config {
        image        = var.gpu_image
        args         = ["gpu-node"]
        network_mode = "host"
      }

      volume_mount {
        volume      = "weights"
        destination = "/models"
      }

      # SIGTERM: the node stops claiming work, lets running work finish for
      # drain_grace_s, hands back the rest and deregisters; Nomad waits a
      # margin beyond that before SIGKILL. (Clients cap this at their
      # max_kill_timeout: raise it there, docs/DEPLOY.md.)
      kill_signal  = "SIGTERM"
      kill_timeout = "${var.drain_grace_s + 30}s"

      template {
        destination = "local/sdapi.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          SDAPI_MODEL=${var.model}
          SDAPI_MODEL_NAME=${var.model_name}
          SDAPI_MODEL_DIR=/models
          SDAPI_GPU_DEVICE=cuda
          SDAPI_GPU_HEALTH_HOST=0.0.0.0
          SDAPI_GPU_DRAIN_GRACE_S=${var.drain_grace_s}
          SDAPI_LOG_LEVEL=INFO
          SDAPI_NODE_ID={{ env "NOMAD_ALLOC_ID" }}
          SDAPI_GPU_HEALTH_PORT={{ env "NOMAD_PORT_health" }}
          SDAPI_GPU_ADVERTISE_HOST={{ env "NOMAD_IP_health" }}
          SDAPI_CONSUL_URL=http://127.0.0.1:8500
          SDAPI_REDIS_URL=redis://sdapi-redis.service.consul/0
        EOT
      }

      resources {
        cpu    = var.gpu_cpu
        memory = var.gpu_memory

        device "nvidia/gpu" {
          count = 1

          constraint {
            attribute = "${device.attr.memory}"
            operator  = ">="
            value     = var.gpu_memory_min
          }
        }
      }
    }
  }
}
