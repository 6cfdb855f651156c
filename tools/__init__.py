"""Development tools of this repository (not part of the ctrlnet package): see tools/generate.py."""
