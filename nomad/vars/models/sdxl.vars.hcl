# Stable Diffusion XL base 1.0, downloaded once per machine into the weights
# volume. Job ID: sdapi-gpu-sdxl.
model          = "stabilityai/stable-diffusion-xl-base-1.0"
model_name     = "sdxl"
gpu_memory_min = "20 GiB"
queue_per_node = 2
drain_grace_s  = 120
