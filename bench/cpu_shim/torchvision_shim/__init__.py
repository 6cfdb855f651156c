"""A stand-in for the slice of torchvision that diffusers' train_controlnet.py uses (transforms
for PIL images), for timing that script unchanged on machines where PyPI's torchvision does not
import beside the installed torch. Same operations: bilinear resize of the short side, center
crop, HWC uint8 -> CHW float in [0, 1], per-channel normalize."""
