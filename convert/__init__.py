"""ImageFolder trees -> FFCV (.beton) and DALI (WebDataset shards) datasets with a manifest."""
