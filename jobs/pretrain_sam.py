"""Ray job entrypoint for SAM pretraining; the same arguments as `urbancross pretrain-sam`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pretrain_sam.py --config urbancross/assets/sam-tiny.yaml [--set sam_pretrain.steps=100]

The stage's `ray.init()` (no address) joins the cluster the job was submitted to (RAY_ADDRESS is
set there), or starts a local Ray when run by hand. `sam_pretrain.output` must be on storage the
driver can write.
"""

import sys

from urbancross.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain-sam", *sys.argv[1:]]))
