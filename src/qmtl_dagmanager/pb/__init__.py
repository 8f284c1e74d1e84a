"""Generated gRPC stubs: regenerate with `make proto`, never edit."""
