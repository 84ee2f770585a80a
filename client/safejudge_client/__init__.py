"""gRPC client for safejudge."""
