"""Training drivers: shared utilities (:mod:`.common`: checkpoints, RNG, EMA, logging, LR schedule, batch
order) and the VQ tokenizer trainer (:mod:`.vqvae`)."""
