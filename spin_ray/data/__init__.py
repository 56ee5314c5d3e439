"""The data plane: SFT sources and their row rule, `prepare` on the cluster, the records' schemas, a run's
layout on storage (`RunLayout`) and its manifest."""
