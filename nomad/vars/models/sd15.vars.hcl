# Stable Diffusion 1.5, downloaded once per machine into the weights volume.
# Job ID: sdapi-gpu-sd15.
model          = "stable-diffusion-v1-5/stable-diffusion-v1-5"
model_name     = "sd15"
gpu_memory_min = "12 GiB"
queue_per_node = 4
