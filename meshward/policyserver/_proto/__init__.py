"""Generated gRPC stubs for policy.proto (regenerate with ``make proto``; never edit by hand)."""
