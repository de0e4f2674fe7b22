"""ubt-ray job: evaluate: zero-shot clean accuracy and attack success rate.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("evaluate")

if __name__ == "__main__":
    sys.exit(main())
