# The ingress: Traefik on the ingress machines (one per machine), reading the Consul catalog
# for services tagged traefik.enable=true (web's `sdapi-http`) and balancing
# HTTP and WebSocket traffic over their healthy instances only (Consul's
# passing checks, and Traefik's own health check on /readyz). WebSockets need
# nothing special: Traefik forwards the Upgrade and keeps the connection.
#
#   nomad job run -var-file=nomad/vars/production.vars.hcl nomad/traefik.nomad.hcl
#
# TLS is left to the load balancer in front, or to an entrypoint added here.

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the ingress may run in."
}

variable "traefik_image" {
  type        = string
  default     = "traefik:v3.3"
  description = "The Traefik image."
}

variable "ingress_node_class" {
  type        = string
  default     = "ingress"
  description = "Node class of the machines that take public traffic."
}

variable "ingress_count" {
  type        = number
  default     = 2
  description = "Traefik instances, each on its own ingress machine."
}

variable "http_port" {
  type        = number
  default     = 80
  description = "Port the ingress listens on for users."
}

job "sdapi-traefik" {
  datacenters = var.datacenters
  type        = "service"

  constraint {
    attribute = "${node.class}"
    value     = var.ingress_node_class
  }

  # Each instance holds the machine's public port.
  constraint {
    operator = "distinct_hosts"
    value    = "true"
  }

  update {
    max_parallel      = 1
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
  }

  group "traefik" {
    count = var.ingress_count

    network {
      mode = "host"
      port "web" {
        static = var.http_port
      }
      port "admin" {}
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    reschedule {
      delay          = "30s"
      delay_function = "exponential"
      max_delay      = "5m"
      unlimited      = true
    }

    service {
      name     = "sdapi-traefik"
      port     = "web"
      provider = "consul"

      # Traefik's own liveness endpoint, on the admin port.
      check {
        name     = "ping"
        type     = "http"
        port     = "admin"
        path     = "/ping"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "traefik" {
      driver = "docker"

      config {
        image        = var.traefik_image
        network_mode = "host"
        args         = ["--configFile=/local/traefik.yaml"]
      }

      # Lets open WebSockets close (clients reconnect to another replica).
      kill_timeout = "30s"

      template {
        destination = "local/traefik.yaml"
        change_mode = "restart"
        data        = <<-EOT
          entryPoints:
            web:
              address: ":{{ env "NOMAD_PORT_web" }}"
              transport:
                respondingTimeouts:
                  # Long WebSocket sessions and slow uploads stay open.
                  readTimeout: 0s
                  idleTimeout: 300s
            traefik:
              address: ":{{ env "NOMAD_PORT_admin" }}"
          ping:
            entryPoint: traefik
          api:
            dashboard: false
          metrics:
            prometheus:
              entryPoint: traefik
          providers:
            consulCatalog:
              exposedByDefault: false
              # Only instances whose Consul checks all pass are routed to.
              strictChecks: ["passing"]
              endpoint:
                address: "127.0.0.1:8500"
                scheme: http
          accessLog: {}
        EOT
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
