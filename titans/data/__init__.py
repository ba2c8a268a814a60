"""Data: tokenizers, tokenised shards, and the batch sources the trainer reads."""
