"""ubt-ray job: score: UBT step 2, every row of the suspicious shards scored on Ray Data.

    ray job submit --working-dir . -- python jobs/score.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("score")

if __name__ == "__main__":
    sys.exit(main())
