"""Cluster operations from the workstation: connect, submit, status, logs, list, delete, suspend.

Uses the official `kubernetes` client (the `k8s` extra); imported only inside command bodies."""
