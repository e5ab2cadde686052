# The built-in tiny model (random weights, made on the node): a smoke test of a
# cluster, no download. Job ID: sdapi-gpu-tiny.
model          = "tiny"
model_name     = "tiny"
gpu_memory_min = "4 GiB"
queue_per_node = 8
