import os

# Keep each test process (and the ranks it launches) to one intra-op thread: ranks
# share two cores, and oversubscription makes collectives crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
