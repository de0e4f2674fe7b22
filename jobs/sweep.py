"""ubt-ray job: sweep: Ray Tune over the unlearning knobs (sweep.space); an interrupted sweep resumes.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("sweep")

if __name__ == "__main__":
    sys.exit(main())
