"""Services: one use case per verb, shared by the operator and the sidecar."""
