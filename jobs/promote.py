"""Ray job entrypoint for the registry gate; the same arguments as `urbancross promote`.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/promote.py --config CONFIG --run RUN_ID

Evaluates the candidate and the current champion on the promotion split in the job's
driver (one small split, no actor pool), then moves the `champion` or `challenger`
alias. `mlflow.tracking_uri` must be the tracking server the run was logged to.
"""

import sys

from urbancross.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
