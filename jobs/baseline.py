"""ubt-ray job: baseline: fine-tuning (ft) or CleanCLIP on clean pairs.

    ray job submit --working-dir . -- python jobs/baseline.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("baseline")

if __name__ == "__main__":
    sys.exit(main())
