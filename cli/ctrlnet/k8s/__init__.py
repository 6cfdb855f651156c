"""Kubernetes side of the workstation CLI: the chart and its Helm engine, offline validation.

    chart.py    where the chart is, its values (= the JobConfig)
    helm.py     the Helm engine: a `helm` binary, or helm-python-sdk in-process
    render.py   a job config -> its objects, in apply order
    yamlio.py   objects to and from YAML text
    validate.py validate_objects(): schemas.py (kinds' and CRDs' schemas), then rules.py (the
                rules no schema encodes, over the views of jobs in jobs.py); problem.py: what they report

The packages of the k8s extra (helm-python-sdk, kubernetes-validate, jsonschema) are imported
inside functions through ctrlnet.extras.require, so importing this package is cheap and
`ctrlnet --help` never pays for them.
"""
