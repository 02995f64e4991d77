"""Pre-encoding: image embeddings computed ahead of the annotators (URL index, scheduler, project listing,
RQ jobs and worker). The on-disk store they fill is SAM's own (:mod:`ml_backend.sam.store`)."""
