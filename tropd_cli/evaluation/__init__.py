"""`tropd evaluate`: benchmarks as data, graders, metrics (avg@k, pass@k, maj@k) and side-by-side reports."""
