import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Never touch the network or a user's HF cache from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).parent.parent / ".hf_home_tests"))
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
