"""Ray job entrypoint for the cross-domain evaluation; the same arguments as `urbancross evaluate`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/evaluate.py --config CONFIG

Inside a submitted job Ray Data joins the job's cluster (RAY_ADDRESS is set), so the
embedding actors (evaluate.num_cpus / num_gpus each) spread over its nodes. The model
files and the manifest must be readable from every node, and `mlflow.tracking_uri` must
be a tracking server, not a local SQLite file.
"""

import sys

from urbancross.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
