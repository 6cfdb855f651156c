"""A stand-in for the slice of torchvision that diffusers' train_controlnet.py and
train_controlnet_sdxl.py use (transforms for PIL images, and the interpolation modes the SDXL
script lists and resizes with: lanczos by default), for timing those scripts unchanged on machines
where PyPI's torchvision does not import beside the installed torch. Same operations: resize of
the short side, center crop, HWC uint8 -> CHW float in [0, 1], per-channel normalize."""
