"""ubt-ray job: compare: no defense, FT, CleanCLIP and UBT per attack.

    ray job submit --working-dir . -- python jobs/compare.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("compare")

if __name__ == "__main__":
    sys.exit(main())
