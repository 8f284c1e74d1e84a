"""The sidecar: the Gateway-compatible gRPC server and the HTTP admin, in the Gateway's pod."""
