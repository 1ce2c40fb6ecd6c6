"""The names of a run directory's files (the package docstring says what each holds)."""

RESULTS = "results.jsonl"
DONE = "done"
FAILED = "failed"
LOCK = "lock"
RESUME = "resume.pt"
SPLITS = "splits.json"
MODEL = "model.pkl"
PREVIEWS = "previews"  # a few generated images per stage and domain (generative methods)
FINGERPRINT = "fingerprint.json"
SHARED_SPLITS = ".splits"  # next to the run dirs: one index file per (dataset, trial, holdout), shared
SUBMITTED = "submitted.json"
CLAIM_MUTEX = ".lock.claim"  # created with O_EXCL around check-and-write of the lock (NFS-safe)
