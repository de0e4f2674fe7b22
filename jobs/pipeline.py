"""ubt-ray job: the whole pipeline (pipeline.phases: prepare, poison, train, evaluate, defend).

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("pipeline")

if __name__ == "__main__":
    sys.exit(main())
