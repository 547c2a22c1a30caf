"""`python -m moetron.monitor.dashboard --entity E --project P`: create the dashboard.yaml workspace in wandb."""

import argparse
import sys
from pathlib import Path

import yaml

DASHBOARD = Path(__file__).with_name("dashboard.yaml")


def load_dashboard() -> dict:
    return yaml.safe_load(DASHBOARD.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="moetron")
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        print("moetron: error: the dashboard needs the `wandb-workspaces` package "
              "(pip install wandb-workspaces) and an online wandb account.", file=sys.stderr)
        return 2
    spec = load_dashboard()
    sections = []
    for section in spec["sections"]:
        panels = []
        for panel in section["panels"]:
            if panel["type"] == "media":
                panels.append(wr.MediaBrowser(title=panel["title"], media_keys=[panel["key"]]))
            elif panel["type"] == "bar":
                panels.append(wr.BarPlot(title=panel["title"], metrics=panel["y"]))
            elif "y_regex" in panel:
                panels.append(wr.LinePlot(title=panel["title"], metric_regex=panel["y_regex"]))
            else:
                panels.append(wr.LinePlot(title=panel["title"], y=panel["y"], log_y=panel.get("log_y", False)))
        sections.append(ws.Section(name=section["name"], panels=panels, is_open=True))
    workspace = ws.Workspace(name=spec["name"], entity=args.entity, project=args.project, sections=sections)
    workspace.save()
    print(f"moetron: saved workspace {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
