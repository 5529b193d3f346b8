"""Ray job entrypoint for a sweep; the same arguments as `urbancross tune`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/tune.py --space tune_spaces/curriculum.yaml --config CONFIG

Inside a submitted job Ray Tune joins the job's cluster (RAY_ADDRESS is set), so every
trial's Train workers land on the cluster's nodes. Use an MLflow tracking server URI
(`mlflow.tracking_uri`) and shared `tune.storage_path` there, not local files.
"""

import sys

from urbancross.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
