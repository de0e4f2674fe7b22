"""ubt-ray job: overfit: UBT step 1, a copy of the model overfit on the suspicious shards.

    ray job submit --working-dir . -- python jobs/overfit.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("overfit")

if __name__ == "__main__":
    sys.exit(main())
