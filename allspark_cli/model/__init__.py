"""The segmentor: encoder (MiT or DINOv2, model/backbones.py), AllSpark module, SegFormer head (DESIGN.md sections 1-2)."""
from allspark_cli.torch_floor import check_torch_version

check_torch_version()  # for users of the Python API; the CLI checks before importing anything
