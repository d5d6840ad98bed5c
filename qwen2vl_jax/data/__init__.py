"""Data: preprocessing, tokenizer, sample formats, packing and the Grain pipeline."""
