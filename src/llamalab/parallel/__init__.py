"""Running one model across several processes (torch.distributed): tensor parallelism.

``tensor.py`` splits a model's weights across the ranks of a device mesh; ``loading.py``
reads each rank's slices of a checkpoint and nothing else.
"""
