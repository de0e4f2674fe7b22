"""ubt-ray job: train: CLIP training or fine-tuning on shards with Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --config configs/quickstart.yaml [section.key=value ...]
"""

import sys

from _job import job

main = job("train")

if __name__ == "__main__":
    sys.exit(main())
