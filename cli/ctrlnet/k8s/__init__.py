"""Kubernetes side of the workstation CLI: chart values, the Helm engine, offline validation.

Heavy imports (helm-python-sdk, kubernetes-validate, jsonschema) stay inside functions, so
importing this package is cheap and `ctrlnet --help` never pays for them.
"""
