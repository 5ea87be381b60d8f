"""The scan-time daemon: durable store, watcher, workers, gRPC API, metrics and the review page."""
