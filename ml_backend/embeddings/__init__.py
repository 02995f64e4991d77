"""Image embeddings kept on disk and computed ahead of the annotators (store, identity, scheduler, RQ jobs)."""
