"""Ship the Helm chart inside the wheel as ctrlnet/_chart, but only in real wheels.

An editable install must not get it: a real site-packages/ctrlnet/ folder would shadow the
editable mapping of the `ctrlnet` package (ctrlnet.k8s.chart finds charts/ctrlnet in the repo)."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ChartInWheel(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name == "wheel" and version != "editable":
            build_data["force_include"]["charts/ctrlnet"] = "ctrlnet/_chart"
