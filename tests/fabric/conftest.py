"""Fabric tests import the shared helpers from tests/ (brokers, helpers, agent_proc, proxy)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
