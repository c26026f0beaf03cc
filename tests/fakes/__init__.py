"""Local stand-ins for remote services: the GCS and GCE fakes, and moto/GCS store fixtures."""
