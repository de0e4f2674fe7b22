"""ubt-ray job: select: UBT step 3, the top-k rows and a retain set.

    ray job submit --working-dir . -- python jobs/select.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("select")

if __name__ == "__main__":
    sys.exit(main())
