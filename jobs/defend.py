"""ubt-ray job: defend: UBT end to end with a report.

    ray job submit --working-dir . -- python jobs/defend.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("defend")

if __name__ == "__main__":
    sys.exit(main())
