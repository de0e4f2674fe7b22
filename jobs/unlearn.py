"""ubt-ray job: unlearn: UBT step 4, token-portion unlearning with Ray Train.

    ray job submit --working-dir . -- python jobs/unlearn.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("unlearn")

if __name__ == "__main__":
    sys.exit(main())
