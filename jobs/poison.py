"""ubt-ray job: poison: clean shards into poisoned shards plus the saved trigger.

    ray job submit --working-dir . -- python jobs/poison.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("poison")

if __name__ == "__main__":
    sys.exit(main())
