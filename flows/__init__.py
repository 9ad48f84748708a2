"""Prefect flows that chain the DVC stages (see flows/pipeline.py and flows/serve.py).

Prefect keeps its local state inside the project (`.prefect/`) rather than `~/.prefect`, and
its telemetry is off (it only adds errors on a machine without internet); both are ordinary
Prefect settings that a user's own environment overrides.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
