"""Published EDL checkpoints: one ``<architecture>.<tag>.yaml`` per Hugging Face Hub repository.

Installed as ``edl_timm.hub_configs``; ``edl_timm.hub`` reads and validates these files and the
model families register them as timm pretrained tags. See README.md here for the fields.
"""
