"""Cloud launch support: the gcloud commands that create TPU VM slices and start runs on them."""
