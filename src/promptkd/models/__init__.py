"""Model definitions: CLIP towers with prompt points, checkpoint loading, tokenizer, backbones."""
