"""ubt-ray job: prepare: a source into validated Parquet shards.

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("prepare")

if __name__ == "__main__":
    sys.exit(main())
