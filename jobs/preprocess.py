"""Ray job entrypoint for preprocessing; the same arguments as `urbancross preprocess`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/preprocess.py --config CONFIG --set preprocess.sam.num_gpus=1

`ray.init()` with no address joins the cluster the job was submitted to (RAY_ADDRESS is
set there), or starts a local Ray when run by hand. On a cluster, `preprocess.input`,
`preprocess.output` and the model paths must be visible to every node (shared storage or
s3://... for the manifests; model files baked into the image or on shared disk).
"""

import sys

import ray

from urbancross.cli import main

if __name__ == "__main__":
    ray.init()
    sys.exit(main(["preprocess", *sys.argv[1:]]))
