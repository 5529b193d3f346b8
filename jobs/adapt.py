"""Ray job entrypoint for the adapt stage; the same arguments as `urbancross adapt`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/adapt.py --config CONFIG [--set train.num_workers=8 --set train.use_gpu=true] [--resume]

The stage's `ray.init()` (no address) joins the cluster the job was submitted to (RAY_ADDRESS is
set there), or starts a local Ray when run by hand; the Train workers then spread over its
nodes. On a cluster, out_dir (Train storage, the exported model) and the manifest must be on
storage every node can read, and `mlflow.tracking_uri` must be a tracking server.
"""

import sys

from urbancross.cli import main

if __name__ == "__main__":
    sys.exit(main(["adapt", *sys.argv[1:]]))
